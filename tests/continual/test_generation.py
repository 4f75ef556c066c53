"""Generation-based evaluation: the answer normalisers, and the metric driving `generate` through the collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from keeplora_hf.continual.generation import (
    NORMALIZERS,
    exact_match_score,
    generation_metric,
    multiple_choice_letter,
    multiple_choice_score,
    normalize_vqa_answer,
    references_of,
    token_f1_score,
    vqa_accuracy,
)
from keeplora_hf.data import VLMChatCollator
from keeplora_hf.models import build_tiny, build_tiny_processor


def test_exact_match_ignores_case_space_and_final_punctuation():
    assert exact_match_score("  Red. ", ["red"]) == 1.0
    assert exact_match_score("dark red", ["red"]) == 0.0
    assert exact_match_score("blue", ["red", "Blue"]) == 1.0


def test_vqa_accuracy_counts_matching_human_answers():
    answers = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two", answers) == 1.0  # three humans said 2 (number words normalised)
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("2", ["2", "3", "3"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("2", ["2", "2", "3"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("four", answers) == 0.0
    assert vqa_accuracy("The dog.", ["dog"]) == 1.0  # a single answer: exact match under the VQA normalisation
    assert normalize_vqa_answer("It's a  Dog, isnt it?") == "it's dog isn't it"
    assert normalize_vqa_answer("3.5 cm.") == "3.5 cm"


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("D.", "D"), ("A. a cat", "A"), ("(B) dog", "B"),
    ("The answer is C.", "C"), ("Answer: D", "D"), ("a dog", None), ("the answer is a dog", None), ("", None),
])
def test_multiple_choice_letter(text, letter):
    assert multiple_choice_letter(text) == letter


def test_multiple_choice_score():
    assert multiple_choice_score("(B) the red one", ["B"]) == 1.0
    assert multiple_choice_score("A", ["B. red"]) == 0.0
    assert multiple_choice_score("red", ["red"]) == 1.0  # a reference without a letter falls back to exact match


def test_token_f1():
    assert token_f1_score("a red car", ["the red car parked"]) == pytest.approx(0.8)
    assert token_f1_score("blue", ["red"]) == 0.0
    assert token_f1_score("red car", ["x", "red car"]) == 1.0


def test_references_prefer_the_answers_column():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "red"}]
    assert references_of({"messages": messages}) == ["red"]
    assert references_of({"messages": messages, "answers": ["a", "b"]}) == ["a", "b"]
    assert references_of({"messages": messages, "answers": []}) == ["red"]
    with pytest.raises(ValueError, match="no reference answer"):
        references_of({"id": "x", "messages": messages[:1]})


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("generation") / "a.png"
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(path)
    return str(path)


def _row(image: str, answer: str, **extra) -> dict:
    return {"id": answer, "images": [image], "messages": [
        {"role": "user", "content": "<image>\nwhat colour is the image?"}, {"role": "assistant", "content": answer}],
        **extra}


class ScriptedModel(nn.Module):
    """`generate` answers each prompt with a scripted text (by batch position), after checking the batch."""

    def __init__(self, tokenizer, answers: list[str]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.seen = tokenizer, list(answers), []

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, do_sample, **kwargs):
        assert not do_sample and "labels" not in kwargs
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
        assert pixel_values.dtype == self.weight.dtype
        self.seen.append(input_ids.shape[0])
        new = []
        for _ in range(input_ids.shape[0]):
            ids = self.tokenizer(self.answers.pop(0), add_special_tokens=False)["input_ids"][:max_new_tokens]
            new.append(ids + [self.tokenizer.eos_token_id] * (max_new_tokens - len(ids)))
        return torch.cat([input_ids, torch.tensor(new)], dim=1)


def test_metric_generates_with_the_generation_collator_and_scores(image):
    processor = build_tiny_processor("llava")
    training_collator = VLMChatCollator(processor, max_length=96, model_family="llava")
    rows = [_row(image, "red"), _row(image, "blue"), _row(image, "two", answers=["2", "2", "2", "3"]),
            _row(image, "green")]
    model = ScriptedModel(processor.tokenizer, ["red", "green", "two", "green ."])
    score = generation_metric(training_collator, "vqa", batch_size=3, max_new_tokens=4)(model, rows)
    assert model.seen == [3, 1]
    assert score == pytest.approx((1 + 0 + 1 + 1) / 4)
    model = ScriptedModel(processor.tokenizer, ["red", "blue"])
    assert generation_metric(training_collator, "exact_match", max_samples=2)(model, rows) == 1.0
    custom = generation_metric(training_collator, lambda prediction, references: 0.5)
    assert custom(ScriptedModel(processor.tokenizer, ["x"] * 4), rows) == 0.5
    with pytest.raises(ValueError, match="unknown normalizer"):
        generation_metric(training_collator, "bleu")
    assert set(NORMALIZERS) == {"exact_match", "vqa", "multiple_choice", "token_f1"}


def test_metric_runs_real_generation_on_tiny_models(image, tmp_path):
    """The tiny LLaVA and Qwen2-VL generate through the metric (accuracy of a random model: anything in [0, 1])."""
    for name in ("llava", "qwen2_vl"):
        collator = VLMChatCollator(build_tiny_processor(name), max_length=96, model_family=name, for_generation=True)
        model = build_tiny(name).model
        value = generation_metric(collator, "exact_match", batch_size=2, max_new_tokens=3)(model, [_row(image, "red")] * 3)
        assert 0.0 <= value <= 1.0
        assert model.training  # the metric restores the mode it found
