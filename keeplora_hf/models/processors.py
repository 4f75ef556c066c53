"""Offline tokenizers and processors for the tiny models of `tiny.py`.

The Hub cannot be reached, so every processor is assembled from the real transformers classes
(`LlavaProcessor`, `LlavaNextVideoProcessor`, `VideoLlavaProcessor`, `Qwen2VLProcessor`,
`CLIPProcessor`) around a word-level tokenizer whose special ids are the ones the tiny models
were configured with. The result behaves like a downloaded processor: it expands `<image>` /
`<video>` into the number of placeholder tokens the model checks, has a chat template, and
round-trips through `save_pretrained` / `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPProcessor,
    LlavaNextImageProcessor,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    VideoLlavaImageProcessor,
    VideoLlavaProcessor,
    VideoLlavaVideoProcessor,
)
from transformers.processing_utils import ProcessorMixin

from .tiny import (
    BOS_ID,
    EOS_ID,
    FIRST_TEXT_ID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PAD_ID,
    PATCH_SIZE,
    TINY_MODELS,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
)

__all__ = [
    "CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "TINY_VOCABULARY",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "llava_chat_template",
]

# Every word the demo's questions and answers may use, lower-case (the tokenizer lower-cases its input).
# Anything else becomes <unk>. The list must fit the tiny models' text ids, FIRST_TEXT_ID..FIRST_SPECIAL_ID - 1
# (121 ids at VOCAB_SIZE = 128; 119 used, <unk> included).
TINY_VOCABULARY: tuple[str, ...] = (
    "<unk>",
    # chat roles and punctuation
    "user", "assistant", ":", "?", ".", ",",
    # digits and counts
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "cyan",
    # shapes
    "circle", "square", "triangle", "star", "cross", "diamond", "rectangle", "ring", "line", "dot", "heart",
    "hexagon",
    # positions and directions
    "left", "right", "up", "down", "top", "bottom", "middle", "center", "above", "below", "corner", "side",
    # motion and time, for video questions
    "move", "moves", "moving", "still", "clockwise", "first", "last", "before", "after", "bigger", "smaller",
    "larger",
    "yes", "no",
    # question and function words
    "what", "which", "where", "how", "many", "is", "are", "does", "do", "there", "the", "a", "an", "of", "in",
    "on", "at", "to", "this", "it", "and", "or", "than", "with", "from",
    # nouns of the questions and of CLIP prompts ("a photo of a red circle.")
    "colour", "color", "shape", "size", "object", "objects", "image", "video", "picture", "photo", "frame",
    "direction", "number", "same", "different", "options",
    # appended (ids of the words above unchanged): the CLIP sequence's colour_count
    "colours",
)  # fmt: skip

UNK_TOKEN, PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<pad>", "<s>", "</s>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
VISION_START_TOKEN, VISION_END_TOKEN = "<|vision_start|>", "<|vision_end|>"
# tiny.py's CLIP ends every text with VOCAB_SIZE - 1 (a non-2 EOS selects CLIP's first-EOS pooling).
CLIP_BOS_TOKEN, CLIP_EOS_TOKEN, CLIP_EOS_ID = "<|startoftext|>", "<|endoftext|>", VOCAB_SIZE - 1
CLIP_MAX_LENGTH = 16  # the tiny CLIP text tower's max_position_embeddings


def llava_chat_template(
    image_token: str = IMAGE_TOKEN, video_token: str = VIDEO_TOKEN, wrap: tuple[str, str] = ("", "")
) -> str:
    """LLaVA-1.5 conversation style: `USER: <image>\nWhat colour? ASSISTANT: red</s>USER: ... ASSISTANT:`.

    Message content may be a string or a list of {"type": "text"|"image"|"video"} blocks, rendered in order,
    so a marker stays where the data put it; `wrap` surrounds each visual marker (Qwen2-VL's vision start and
    end tokens). Every assistant turn ends with EOS, so a model trained on it learns to stop, and is wrapped
    in `{% generation %}` for `return_assistant_tokens_mask`.
    """
    before, after = wrap
    content = (
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for block in message['content'] -%}"
        f"{{%- if block['type'] == 'image' -%}}{{{{ {before + image_token + after!r} }}}}"
        f"{{%- elif block['type'] == 'video' -%}}{{{{ {before + video_token + after!r} }}}}"
        "{%- else -%}{{ block['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}" + content + "{{ ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
        "{%- generation -%}" + content + "{{ eos_token }}{%- endgeneration -%}"
        "{%- else -%}{{ raise_exception('roles must be user or assistant, got ' + message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


CHAT_TEMPLATE = llava_chat_template()
# Qwen2-VL finds each visual span by its <|vision_start|> token (M-RoPE positions), so it wraps every marker.
QWEN2_VL_CHAT_TEMPLATE = llava_chat_template(wrap=(VISION_START_TOKEN, VISION_END_TOKEN))

_VISION_STRATEGY = "default"  # tiny LLaVA-family configs drop CLS from image features
_CLS_TOKENS = 1  # the CLIP vision tower's extra token, counted by the processors' placeholder arithmetic


def _word_level_tokenizer(
    specials: dict[str, int],
    post_processor: processors.PostProcessor,
    words: tuple[str, ...] = TINY_VOCABULARY,
    vocab_size: int = VOCAB_SIZE,
) -> Tokenizer:
    """Word-level `tokenizers.Tokenizer`: one id per word, digits split, punctuation isolated.

    A word-level model keeps every answer a single token (so the demo's exact-match metric is about words,
    not sub-word pieces) and makes hand-checked label masks readable. Words take the ids from `FIRST_TEXT_ID` on
    that no special token holds.
    """
    vocab = dict(specials)
    free = (i for i in range(FIRST_TEXT_ID, vocab_size) if i not in set(specials.values()))
    for word in words:
        index = next(free, None)
        if index is None:
            raise ValueError(f"{len(words)} words do not fit a vocabulary of {vocab_size} ids")
        vocab[word] = index
    used = set(vocab.values())
    # Ids left free still need a token, so that decoding any id the model may emit is defined.
    vocab.update({f"<unused{i}>": i for i in range(vocab_size) if i not in used})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Whitespace(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.post_processor = post_processor
    return tokenizer


def build_tiny_tokenizer(
    name: str = "llava", words: tuple[str, ...] = TINY_VOCABULARY, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """The tokenizer of tiny model `name`: shared word list, the model's special ids, its chat template.

    Every chat model adds `<s>` in front (like Llama) and no `</s>` (the chat template ends assistant turns
    with it); CLIP wraps text in `<|startoftext|> ... <|endoftext|>` with the end id the tiny CLIP pools at.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    if name == "clip":
        specials = {PAD_TOKEN: PAD_ID, CLIP_BOS_TOKEN: BOS_ID, CLIP_EOS_TOKEN: CLIP_EOS_ID}
        post = processors.TemplateProcessing(
            single=f"{CLIP_BOS_TOKEN} $A {CLIP_EOS_TOKEN}",
            special_tokens=[(CLIP_BOS_TOKEN, BOS_ID), (CLIP_EOS_TOKEN, CLIP_EOS_ID)],
        )
        tokens = {"bos_token": CLIP_BOS_TOKEN, "eos_token": CLIP_EOS_TOKEN, "model_max_length": CLIP_MAX_LENGTH}
    else:
        specials = {
            PAD_TOKEN: PAD_ID,
            BOS_TOKEN: BOS_ID,
            EOS_TOKEN: EOS_ID,
            IMAGE_TOKEN: IMAGE_TOKEN_ID,
            VIDEO_TOKEN: VIDEO_TOKEN_ID,
            VISION_START_TOKEN: VISION_START_ID,
            VISION_END_TOKEN: VISION_END_ID,
        }
        post = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
        )
        tokens = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "image_token": IMAGE_TOKEN,
            "video_token": VIDEO_TOKEN,
            "vision_start_token": VISION_START_TOKEN,
            "vision_end_token": VISION_END_TOKEN,
            "chat_template": QWEN2_VL_CHAT_TEMPLATE if name == "qwen2_vl" else CHAT_TEMPLATE,
        }
    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level_tokenizer(specials, post, words, vocab_size),
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        **tokens,
    )


def _square(size: int) -> dict[str, dict[str, int]]:
    """Resize-then-crop to the tiny towers' fixed input: CLIP position embeddings are not interpolated."""
    return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}


def _qwen_pixels() -> dict[str, int]:
    """Keep images at most IMAGE_SIZE^2 pixels: Qwen2-VL's default minimum (56^2) would upscale 16x16 inputs.

    The resize factor is patch * merge = 8, so any image lands on a grid the 2x2 merger can fold.
    """
    factor = PATCH_SIZE * 2
    return {"min_pixels": factor * factor, "max_pixels": IMAGE_SIZE * IMAGE_SIZE}


def build_tiny_processor(name: str) -> ProcessorMixin:
    """The transformers processor matching tiny model `name`, built offline.

    Its inputs have exactly the placeholder counts the tiny model checks: 16 per image for LLaVA and
    Video-LLaVA, 4 per 16x16 image or 2-frame clip for Qwen2-VL, 8 per 2-frame clip for LLaVA-NeXT-Video,
    34 for Video-LLaVA (CLS kept per frame).
    """
    tokenizer = build_tiny_tokenizer(name)
    common = {
        "patch_size": PATCH_SIZE,
        "vision_feature_select_strategy": _VISION_STRATEGY,
        "num_additional_image_tokens": _CLS_TOKENS,
    }
    if name == "llava":
        return LlavaProcessor(
            image_processor=CLIPImageProcessor(**_square(IMAGE_SIZE)),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            **common,
        )
    if name == "llava_next_video":
        return LlavaNextVideoProcessor(
            video_processor=LlavaNextVideoVideoProcessor(**_square(IMAGE_SIZE)),
            image_processor=LlavaNextImageProcessor(
                **_square(IMAGE_SIZE), image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]]
            ),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            **common,
        )
    if name == "video_llava":
        return VideoLlavaProcessor(
            image_processor=VideoLlavaImageProcessor(**_square(IMAGE_SIZE)),
            video_processor=VideoLlavaVideoProcessor(**_square(IMAGE_SIZE)),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            **common,
        )
    if name == "qwen2_vl":
        sizes = {"patch_size": PATCH_SIZE, "merge_size": 2, "temporal_patch_size": 2, **_qwen_pixels()}
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**sizes),
            # The reference per-frame pixel cap (and no deprecation warning on every call).
            video_processor=Qwen2VLVideoProcessor(**sizes, cap_pixels_per_frame=True),
            tokenizer=tokenizer,
            chat_template=QWEN2_VL_CHAT_TEMPLATE,
        )
    if name == "clip":
        return CLIPProcessor(image_processor=CLIPImageProcessor(**_square(IMAGE_SIZE)), tokenizer=tokenizer)
    raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
