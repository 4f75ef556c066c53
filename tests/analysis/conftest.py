"""A tiny LLaVA with two eval sets whose metric is agreement with the unchanged model's top predictions.

Agreement is 1.0 for the unchanged model and falls as soon as an intervention changes what the model predicts, so
each measurement's effect is visible on random weights.
"""

from __future__ import annotations

import pytest
import torch

from keeplora_hf.analysis import EvalSet
from keeplora_hf.models import build_tiny


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is two shared cores: one thread is several times faster than two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def agreement_metric(reference: torch.Tensor):
    def metric(model, batch) -> float:
        with torch.no_grad():
            predicted = model(**_inputs(batch)).logits.argmax(-1)
        return (predicted == reference).float().mean().item()

    return metric


@pytest.fixture
def tiny():
    return build_tiny("llava", seed=0)


@pytest.fixture
def tiny_sets(tiny):
    """`general` and `task`: one batch of 4 each, measured by agreement with the unchanged model."""
    sets = {}
    for name, seed in (("general", 1), ("task", 2)):
        batch = tiny.make_batch(4, seed)
        with torch.no_grad():
            reference = tiny.model(**_inputs(batch)).logits.argmax(-1)
        sets[name] = EvalSet(batch, agreement_metric(reference), chance=0.0, size=4)
    return sets

