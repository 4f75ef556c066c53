"""Batches for the model families, built around their transformers processors.

The processor does what only it knows (its chat template, how many placeholder tokens an image or a clip
expands to, the pixel layout its model wants); the collator adds what training needs on top:

- labels: -100 everywhere except the assistant answers (every assistant turn, each ending with EOS), so the
  loss is on answers only; padding is -100 too;
- right padding for training, left padding and no final answer for `generate`;
- truncation to `max_length` that never cuts a visual token: it raises instead. `validate_lengths` finds, before
  training, every row whose answer truncation would cut.

Answer spans are found by rendering the conversation prefix by prefix with the chat template (the answer of
turn i is what rendering turn i adds after the generation prompt), so any prefix-stable template works,
including ones without `{% generation %}` markers, such as those of the released LLaVA checkpoints.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from ..constants import IGNORE_INDEX
from ..models.processors import llava_chat_template
from .formats import IMAGE_MARKER, VIDEO_MARKER
from .rows import DataFormatError, row_name, source_of, too_many_pixels
from .video import read_frames

__all__ = [
    "IGNORE_INDEX",
    "MODEL_FAMILIES",
    "ClipCollator",
    "VLMChatCollator",
    "clip_classification_loss",
    "validate_lengths",
]

# Which inputs each family's model takes. "llava" covers LLaVA-1.5 and LLaVA-NeXT (pixel_values + image_sizes).
MODEL_FAMILIES: dict[str, frozenset[str]] = {
    "llava": frozenset({"images"}),
    "llava_next_video": frozenset({"images", "videos"}),
    "video_llava": frozenset({"images", "videos"}),
    "qwen2_vl": frozenset({"images", "videos"}),
}
# Qwen2-VL finds visual spans by their start token; the fallback prompt format must keep that.
_QWEN_WRAP = ("<|vision_start|>", "<|vision_end|>")
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
# Sequence-shaped outputs, cut together when a batch is truncated.
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")


def content_blocks(content: str) -> list[dict[str, str]]:
    """Message text with `<image>`/`<video>` markers -> processor content blocks, order kept."""
    blocks = []
    for part in _MARKERS.split(content):
        if part == IMAGE_MARKER:
            blocks.append({"type": "image"})
        elif part == VIDEO_MARKER:
            blocks.append({"type": "video"})
        elif part:
            blocks.append({"type": "text", "text": part})
    return blocks


def _load_image(image: str | Image.Image) -> Image.Image:
    """An RGB image from a path (file closed at once) or a PIL image; a `ValueError` naming the file if it cannot be."""
    try:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except Image.DecompressionBombError as error:
        raise ValueError(too_many_pixels(image, error)) from None
    except (OSError, UnidentifiedImageError) as error:  # e.g. a truncated file whose header was fine
        where = "a PIL image" if isinstance(image, Image.Image) else f"image file {str(image)!r}"
        raise ValueError(f"{where} is damaged or not an image ({error})") from None


def _row_id(row: dict, position: int) -> str:
    return repr(row["id"]) if row.get("id") is not None else f"at batch position {position}"


class VLMChatCollator:
    """Turns chat rows (`messages` + `images` and/or `videos`, as the loaders of `formats` produce) into batches.

    `processor`: a LLaVA / LLaVA-NeXT / LLaVA-NeXT-Video / Video-LLaVA / Qwen2-VL processor whose tokenizer is
    fast (offsets are needed). Its chat template is used when it has one; otherwise the plain LLaVA-1.5 format
    of `llava_chat_template` with the processor's own image/video tokens (wrapped in vision start/end tokens
    for Qwen2-VL). `model_family`: a key of `MODEL_FAMILIES`, which says whether videos are accepted.
    `num_frames`: frames sampled per clip, the count the video model was trained with.
    `for_generation`: drop each row's final answer, end with the generation prompt, left-pad, no labels.
    Images may be paths or PIL images, videos paths or `(T, H, W, 3)` uint8 arrays.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        max_length: int,
        model_family: str,
        num_frames: int = 8,
        for_generation: bool = False,
    ) -> None:
        if model_family not in MODEL_FAMILIES:
            raise ValueError(f"unknown model_family {model_family!r}; choose one of {sorted(MODEL_FAMILIES)}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None or tokenizer.eos_token is None:
            raise ValueError("the processor's tokenizer needs a pad token and an EOS token")
        self.processor = processor
        self.max_length = max_length
        self.model_family = model_family
        self.num_frames = num_frames
        self.for_generation = for_generation
        self._eos = tokenizer.eos_token
        image_token = getattr(processor, "image_token", None) or IMAGE_MARKER
        video_token = getattr(processor, "video_token", None) or VIDEO_MARKER
        self.chat_template = processor.chat_template or llava_chat_template(
            image_token, video_token, wrap=_QWEN_WRAP if model_family == "qwen2_vl" else ("", "")
        )
        vocabulary = tokenizer.get_vocab()
        visual_tokens = (image_token, video_token, *_QWEN_WRAP)
        self.visual_token_ids = torch.tensor(sorted({vocabulary[t] for t in visual_tokens if t in vocabulary}))
        # Video-LLaVA's image processor still names its output `pixel_values_images` unless told otherwise.
        self._images_kwargs = {"return_legacy_image_output": False} if model_family == "video_llava" else {}

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """A padded batch no longer than `max_length`, ready for `model(**batch)` or `model.generate(**batch)`."""
        batch = dict(self.encode(rows))
        lengths = batch["attention_mask"].sum(dim=1)
        too_long = (lengths > self.max_length).nonzero().flatten().tolist()
        if not too_long:
            return batch
        if self.for_generation:
            ids = ", ".join(f"{_row_id(rows[i], i)} ({int(lengths[i])} tokens)" for i in too_long)
            raise ValueError(f"prompts longer than max_length={self.max_length} cannot be cut for generation: {ids}")
        cut = batch["input_ids"][:, self.max_length :]
        lost = torch.isin(cut, self.visual_token_ids) & (batch["attention_mask"][:, self.max_length :] == 1)
        if lost.any():
            ids = ", ".join(_row_id(rows[i], i) for i in lost.any(dim=1).nonzero().flatten().tolist())
            raise ValueError(
                f"truncating to max_length={self.max_length} would cut image/video tokens of row(s) {ids}; "
                "raise max_length or use fewer frames or smaller images"
            )
        for key in _SEQUENCE_KEYS:
            if key in batch:
                batch[key] = batch[key][:, : self.max_length]
        return batch

    def encode(self, rows: Sequence[dict]) -> BatchFeature:
        """The batch before truncation (what `validate_lengths` measures), labels included unless generating."""
        texts, spans, images, videos = [], [], [], []
        for position, row in enumerate(rows):
            text, row_spans = self._render(row["messages"])
            texts.append(text)
            spans.append(row_spans)
            row_images, row_videos = self._media(row, position)
            images += row_images
            videos += row_videos
        kwargs: dict[str, Any] = {
            "text": texts,
            "padding": True,
            "padding_side": "left" if self.for_generation else "right",
            "return_tensors": "pt",
        }
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = self._images_kwargs
        if videos:
            kwargs["videos"] = videos
        if not self.for_generation:
            kwargs["return_offsets_mapping"] = True
            kwargs["return_text_replacement_offsets"] = True
        batch = self.processor(**kwargs)
        if not self.for_generation:
            batch["labels"] = self._labels(batch, spans)
        return batch

    def _apply(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def _render(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the character spans of the answers to supervise.

        Each span runs from the end of the generation prompt to the end of the answer turn (trailing whitespace
        excluded), so it covers the answer and any end-of-turn token; EOS is inserted after answers whose
        rendering lacks it.
        """
        conversation = [{"role": m["role"], "content": content_blocks(m["content"])} for m in messages]
        if self.for_generation:
            if conversation and conversation[-1]["role"] == "assistant":
                conversation = conversation[:-1]
            return self._apply(conversation, add_generation_prompt=True), []
        full = self._apply(conversation, add_generation_prompt=False)
        text, spans, consumed = "", [], 0
        for turn, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(conversation[:turn], add_generation_prompt=True)
            answered = self._apply(conversation[: turn + 1], add_generation_prompt=False)
            if not (answered.startswith(prompt) and full.startswith(answered) and len(prompt) >= consumed):
                raise ValueError(
                    "the chat template is not prefix-stable (rendering the first turns is not a prefix of rendering "
                    "more), so answer spans cannot be located; pass a processor with a simpler chat template"
                )
            answer = full[len(prompt) : len(answered)]
            core = answer.rstrip()
            if self._eos not in core:
                core += self._eos
            text += full[consumed : len(prompt)]
            spans.append((len(text), len(text) + len(core)))
            text += core + answer[len(answer.rstrip()) :]
            consumed = len(answered)
        return text + full[consumed:], spans

    def _media(self, row: dict, position: int) -> tuple[list[Image.Image], list[np.ndarray]]:
        """The row's images and clips, loaded, after checking they match its markers one to one."""
        user_text = "".join(m["content"] for m in row["messages"] if m["role"] == "user")
        loaded = []
        for key, marker in (("images", IMAGE_MARKER), ("videos", VIDEO_MARKER)):
            items = row.get(key) or []
            if items and key not in MODEL_FAMILIES[self.model_family]:
                raise ValueError(f"row {_row_id(row, position)}: model family {self.model_family!r} takes no {key}")
            if user_text.count(marker) != len(items):
                raise ValueError(
                    f"row {_row_id(row, position)}: {user_text.count(marker)} {marker} marker(s) but {len(items)} {key}"
                )
            loaded.append(items)
        try:
            images = [_load_image(i) for i in loaded[0]]
        except ValueError as error:
            raise ValueError(f"row {_row_id(row, position)}: an image cannot be decoded: {error}") from error
        videos = [v if isinstance(v, np.ndarray) else read_frames(v, self.num_frames) for v in loaded[1]]
        return images, videos

    def _labels(self, batch: BatchFeature, spans: list[list[tuple[int, int]]]) -> torch.Tensor:
        """-100 except tokens overlapping an answer span, spans shifted past expanded visual placeholders."""
        offsets = batch.pop("offset_mapping")
        replacements = batch.pop("text_replacement_offsets", None)
        if replacements is None:
            raise ValueError(
                f"{type(self.processor).__name__} does not report text_replacement_offsets, which the collator "
                "needs to place labels after the image/video placeholders were expanded"
            )
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, row_spans in enumerate(spans):
            ends = [r["span"][1] for r in replacements[row]]
            gained = [0]
            for r in replacements[row]:
                gained.append(gained[-1] + (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))
            starts, stops = offsets[row, :, 0], offsets[row, :, 1]
            for begin, end in row_spans:
                begin += gained[bisect.bisect_right(ends, begin)]
                end += gained[bisect.bisect_right(ends, end)]
                inside = (starts < end) & (stops > begin) & (batch["attention_mask"][row] == 1)
                labels[row, inside] = batch["input_ids"][row, inside]
        return labels


def validate_lengths(
    dataset: datasets.Dataset | Sequence[dict], collator: VLMChatCollator, max_length: int | None = None
) -> None:
    """Raise `DataFormatError` naming every row whose answer (or visual tokens) would not fit in `max_length`.

    Tokenises each row once, as the collator will, so a run fails before training rather than learning from
    answers that truncation silently removed. `max_length` defaults to the collator's.
    """
    if collator.for_generation:
        raise ValueError("validate_lengths needs a training collator (for_generation=False): it measures labels")
    limit = collator.max_length if max_length is None else max_length
    source = source_of(dataset) if isinstance(dataset, datasets.Dataset) else "<dataset>"
    errors = []
    for index in range(len(dataset)):
        row = dataset[index]
        encoded = collator.encode([row])
        ids, labels = encoded["input_ids"][0], encoded["labels"][0]
        answer = (labels != IGNORE_INDEX).nonzero().flatten()
        visual = torch.isin(ids, collator.visual_token_ids).nonzero().flatten()
        problem = None
        if len(answer) == 0:
            problem = "no answer token to learn from"
        elif answer[-1] >= limit:
            lost = int((answer >= limit).sum())
            problem = f"{len(ids)} tokens: {lost} of the {len(answer)} answer tokens lie past max_length={limit}"
        elif len(visual) and visual[-1] >= limit:
            problem = f"{len(ids)} tokens: image/video tokens lie past max_length={limit}"
        if problem:
            errors.append(f"{row_name(source, index, row)}: {problem}")
    if errors:
        raise DataFormatError(errors)


class ClipCollator:
    """Classification rows (`image` path or PIL image, `label` int) -> `pixel_values` and `labels`.

    With `class_names`, every batch also carries the tokenised class prompts (`input_ids`, `attention_mask`,
    one row per class), which is what `clip_classification_loss` scores each image against.
    """

    def __init__(
        self, processor: ProcessorMixin, class_names: Sequence[str] | None = None, prompt: str = "a photo of a {}."
    ) -> None:
        self.processor = processor
        self.prompts = None
        if class_names is not None:
            texts = [prompt.format(name) for name in class_names]
            self.prompts = processor(text=texts, padding=True, return_tensors="pt")
            limit = processor.tokenizer.model_max_length
            if self.prompts["input_ids"].shape[1] > limit:
                raise ValueError(f"class prompts are {self.prompts['input_ids'].shape[1]} tokens, over {limit}")

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        images = [_load_image(r["image"]) for r in rows]
        batch = {
            "pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"],
            "labels": torch.tensor([int(r["label"]) for r in rows]),
        }
        if self.prompts is not None:
            batch["input_ids"] = self.prompts["input_ids"]
            batch["attention_mask"] = self.prompts["attention_mask"]
        return batch


def clip_classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each image's similarities to all class prompts: a `loss_fn` for `begin_task`/`end_task`.

    CLIP's own contrastive loss treats two images of one class in a batch as negatives of each other; scoring
    against every class prompt does not, and is how CLIP classifies at test time.
    """
    if "input_ids" not in batch:
        raise ValueError("the batch has no class prompts: build the ClipCollator with class_names")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits_per_image, batch["labels"])
