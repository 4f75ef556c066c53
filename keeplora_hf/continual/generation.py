"""Evaluation by generation: greedy decoding of each eval row's answer, scored by a configurable normaliser.

`generation_metric(collator, normalizer=...)` returns a runner metric `(model, eval_dataset) -> accuracy in [0, 1]`.
Each row is rendered by the collator in `for_generation=True` mode (the conversation up to the last answer, the
generation prompt, left padding), the model generates up to `max_new_tokens` greedily, and the decoded text is
scored against the references:

- the row's `answers` column (a list of strings, e.g. the ten human answers of VQAv2), when the dataset has one;
- otherwise the content of the row's last assistant message.

Normalisers (`NORMALIZERS`), each `(prediction, references) -> score in [0, 1]`:

- `exact_match`: 1 if the prediction equals any reference after lower-casing, trimming whitespace and trailing
  punctuation;
- `vqa`: VQA accuracy, `min(#references equal to the prediction / 3, 1)` after the VQA normalisation (punctuation,
  articles, number words -> digits); with a single reference it is exact match under that normalisation;
- `multiple_choice`: the option letter of the prediction (`"B"`, `"(B)"`, `"B. dog"`, `"The answer is B"`) equals
  the reference's letter; references without a letter fall back to exact match;
- `token_f1`: the best token-level F1 against any reference (a stand-in for captioning metrics such as CIDEr, which
  need extra packages).

In a data-parallel run every rank scores its own shard (rows `rank::world_size`) and the sums are all-reduced, so
all ranks return the same accuracy.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..data.collators import VLMChatCollator
from ..distributed import sharded_scores
from ..tuner.statistics import move_to

__all__ = [
    "NORMALIZERS",
    "exact_match_score",
    "generation_metric",
    "multiple_choice_letter",
    "multiple_choice_score",
    "normalize_answer",
    "normalize_vqa_answer",
    "references_of",
    "token_f1_score",
    "vqa_accuracy",
]

logger = logging.getLogger(__name__)

Score = Callable[[str, Sequence[str]], float]

# -- normalisation -------------------------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't", "wont": "won't",
    "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't", "havent": "haven't",
    "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't", "thats": "that's", "whats": "what's",
}  # fmt: skip
_DECIMAL_COMMA = re.compile(r"(\d),(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop surrounding whitespace and trailing `.`/`!`/`?`: exact-match form."""
    return " ".join(str(text).lower().split()).rstrip(".!?").strip()


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's normalisation: punctuation out (decimals kept), number words to digits, no articles."""
    text = " ".join(str(text).lower().replace("\n", " ").replace("\t", " ").split())
    text = _DECIMAL_COMMA.sub(r"\1\2", text)
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    text = "".join(" " if c in _PUNCTUATION and c not in "'." else c for c in text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match_score(prediction: str, references: Sequence[str]) -> float:
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(r) for r in references))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """`min(#matching references / 3, 1)`; a single reference is exact match under the VQA normalisation."""
    predicted = normalize_vqa_answer(prediction)
    matches = sum(predicted == normalize_vqa_answer(r) for r in references)
    if len(references) == 1:
        return float(matches)
    return min(matches / 3.0, 1.0)


_LETTER_ALONE = re.compile(r"^\(?\s*([A-Za-z])\s*\)?[.:)]?$")
_LETTER_FIRST = re.compile(r"^\(?([A-Z])(?:\)|[.:]|\s*\))\s*\S")
_LETTER_STATED = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*\(?([A-Z])\b\)?")


def multiple_choice_letter(text: str) -> str | None:
    """The option letter a text names, upper-cased, or None.

    Accepts a bare letter (`"b"`, `"(B)"`, `"B."`), a letter opening an option (`"B. dog"`, `"(B) dog"`) and a
    stated answer (`"The answer is B"`). A lower-case letter opening a sentence (`"a dog"`) is not a letter.
    """
    text = str(text).strip()
    for pattern in (_LETTER_ALONE, _LETTER_FIRST, _LETTER_STATED):
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    return None


def multiple_choice_score(prediction: str, references: Sequence[str]) -> float:
    letters = [multiple_choice_letter(r) for r in references]
    if any(letter is None for letter in letters):
        return exact_match_score(prediction, references)
    return float(multiple_choice_letter(prediction) in letters)


def token_f1_score(prediction: str, references: Sequence[str]) -> float:
    """Best token-level F1 (SQuAD style, VQA normalisation) against any reference."""
    predicted = normalize_vqa_answer(prediction).split()
    best = 0.0
    for reference in references:
        expected = normalize_vqa_answer(reference).split()
        common = sum((Counter(predicted) & Counter(expected)).values())
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
        elif common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


NORMALIZERS: dict[str, Score] = {
    "exact_match": exact_match_score,
    "vqa": vqa_accuracy,
    "multiple_choice": multiple_choice_score,
    "token_f1": token_f1_score,
}


# -- the metric ----------------------------------------------------------------------------------------------------


def references_of(row: dict, answers_column: str = "answers") -> list[str]:
    """A row's reference answers: its `answers` list when present and non-empty, else its last assistant turn."""
    answers = row.get(answers_column)
    if answers:
        return [str(a) for a in ([answers] if isinstance(answers, str) else answers)]
    messages = row.get("messages") or []
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(
            f"row {row.get('id')!r} has no reference answer: neither {answers_column!r} nor a final answer"
        )
    return [messages[-1]["content"]]


def _generation_collator(collator: VLMChatCollator) -> VLMChatCollator:
    if collator.for_generation:
        return collator
    return VLMChatCollator(
        collator.processor, collator.max_length, collator.model_family, collator.num_frames, for_generation=True
    )


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _cast_floats(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Pixel tensors in the model's dtype (a bf16 model given float32 pixels); integer inputs untouched."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}


def generation_metric(
    collator: VLMChatCollator,
    normalizer: str | Score = "exact_match",
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    answers_column: str = "answers",
    generate_kwargs: dict[str, Any] | None = None,
    max_samples: int | None = None,
) -> Callable[[nn.Module, Any], float]:
    """A runner metric that generates each row's answer and scores it with `normalizer` (a name of `NORMALIZERS`
    or a callable `(prediction, references) -> score`).

    `collator` may be the training collator: its generation twin (`for_generation=True`) is used. `max_samples`
    evaluates only the first rows of each eval set. Decoding is greedy unless `generate_kwargs` say otherwise.
    """
    if isinstance(normalizer, str):
        if normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {sorted(NORMALIZERS)}")
        score = NORMALIZERS[normalizer]
    elif callable(normalizer):
        score = normalizer
    else:
        raise TypeError(f"normalizer must be a name or a callable, got {normalizer!r}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size}, {max_new_tokens}")
    generator = _generation_collator(collator)
    tokenizer = generator.processor.tokenizer
    settings = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **(generate_kwargs or {}),
    }

    def metric(model: nn.Module, dataset: Any) -> float:
        device, dtype = next(model.parameters()).device, _model_dtype(model)
        logged = False

        def score_rows(rows: list[dict]) -> list[float]:
            nonlocal logged
            batch = _cast_floats(move_to(dict(generator(rows)), device), dtype)
            output = model.generate(**batch, **settings)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            predictions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            values = []
            for row, prediction in zip(rows, predictions):
                references = references_of(row, answers_column)
                values.append(float(score(prediction.strip(), references)))
                if not logged:
                    logger.debug("row %r: generated %r, references %r, score %.3f", row.get("id"), prediction,
                                 references, values[-1])
                    logged = True
            return values

        total = sharded_scores(model, dataset, score_rows, batch_size=batch_size, max_rows=max_samples)
        if total[1] == 0:
            raise ValueError("generation_metric: the eval set is empty")
        return float(total[0] / total[1])

    return metric
