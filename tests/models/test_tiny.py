"""Tiny models must run the real architectures end to end and expose usable peft targets."""

from __future__ import annotations

import pytest
import torch

from keeplora_hf.models import TINY_MODELS, TinyVLM, build_tiny, matching_modules


@pytest.fixture(scope="module", params=TINY_MODELS)
def tiny(request: pytest.FixtureRequest) -> TinyVLM:
    """One build per architecture, shared by the tests of this module to keep it fast."""
    return build_tiny(request.param, seed=0)


def _batches_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_all_required_architectures_are_listed() -> None:
    """Downstream tests parametrise over TINY_MODELS, so every family must be in it."""
    assert {"llava", "qwen2_vl", "clip"} <= set(TINY_MODELS)
    assert {"llava_next_video", "video_llava"} & set(TINY_MODELS)


def test_unknown_name_is_rejected() -> None:
    """A typo must fail loudly rather than build some default model."""
    with pytest.raises(ValueError):
        build_tiny("not-a-model")


def test_loss_is_finite_and_backward_reaches_every_target(tiny: TinyVLM) -> None:
    """The real merging/loss code runs, and every targeted Linear takes part in the loss."""
    tiny.model.zero_grad(set_to_none=True)
    batch = tiny.make_batch(2, 0)
    loss = tiny.model(**batch).loss
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    targets = {
        **matching_modules(tiny.model, tiny.language_targets),
        **matching_modules(tiny.model, tiny.vision_targets),
    }
    without_grad = [
        name
        for name, module in targets.items()
        if module.weight.grad is None or not torch.any(module.weight.grad != 0)
    ]
    assert not without_grad, without_grad
    tiny.model.zero_grad(set_to_none=True)


def test_batches_are_deterministic_per_seed(tiny: TinyVLM) -> None:
    """Same seed, same batch (reproducible tests); another seed, another batch."""
    first, again, other = tiny.make_batch(2, 0), tiny.make_batch(2, 0), tiny.make_batch(2, 1)
    assert _batches_equal(first, again)
    assert not _batches_equal(first, other)
    if tiny.name != "clip":
        assert "labels" in first
    else:
        assert first["return_loss"] is True


def test_batch_size_is_respected(tiny: TinyVLM) -> None:
    """Callers pick the batch size; placeholder counts must follow it."""
    batch = tiny.make_batch(3, 0)
    assert batch["input_ids"].shape[0] == 3
    with torch.no_grad():
        assert torch.isfinite(tiny.model(**batch).loss)


def test_loss_does_not_depend_on_train_mode(tiny: TinyVLM) -> None:
    """No dropout, so statistics collected in eval mode match what training sees."""
    batch = tiny.make_batch(2, 0)
    with torch.no_grad():
        tiny.model.train()
        train_loss = tiny.model(**batch).loss
        tiny.model.eval()
        eval_loss = tiny.model(**batch).loss
        tiny.model.train()
    torch.testing.assert_close(train_loss, eval_loss)


def test_same_seed_gives_same_weights() -> None:
    """Model weights are a function of the seed, and building leaves the global RNG alone."""
    state = torch.random.get_rng_state()
    a, b, c = (build_tiny("clip", seed=s).model.state_dict() for s in (0, 0, 1))
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("which", ["language_targets", "vision_targets"])
def test_regexes_match_only_linear_modules(tiny: TinyVLM, which: str) -> None:
    """peft fullmatches these strings; they must hit >= 1 module, all of them nn.Linear."""
    matched = matching_modules(tiny.model, getattr(tiny, which))
    assert matched, f"{which} of {tiny.name} matches nothing"
    not_linear = {name: type(m).__name__ for name, m in matched.items() if type(m) is not torch.nn.Linear}
    assert not not_linear, not_linear


def test_language_and_vision_targets_are_disjoint(tiny: TinyVLM) -> None:
    """A module adapted as both language and vision would be counted twice."""
    language = matching_modules(tiny.model, tiny.language_targets)
    vision = matching_modules(tiny.model, tiny.vision_targets)
    assert not set(language) & set(vision)
    assert all("vision" not in name and "visual" not in name for name in language)


# peft 0.21 still calls the deprecated `is_gradient_checkpointing`; that noise is not ours.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_peft_lora_wraps_exactly_the_matched_modules(tiny: TinyVLM) -> None:
    """The regexes, combined, drive real peft LoRA injection on a fresh copy of the model."""
    peft = pytest.importorskip("peft")
    fresh = build_tiny(tiny.name, seed=0)
    pattern = f"(?:{fresh.language_targets})|(?:{fresh.vision_targets})"
    expected = set(matching_modules(fresh.model, pattern))
    model = peft.get_peft_model(fresh.model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=pattern))
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert wrapped == expected
    loss = model(**fresh.make_batch(2, 0)).loss
    assert torch.isfinite(loss)
    loss.backward()
