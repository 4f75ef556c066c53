"""The memory- and time-saving paths of KeepLoRA++ against the exact ones, on the tiny models.

The gradient sketch, the early-exit feature pass, the narrower-basis state and low-precision state storage must give
what the exact computations give (or a bounded approximation of it), and keep every guarantee of docs/method.md.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from keeplora_hf.tuner.state_io import state_checksum

from keeplora_hf import KeepLoRAConfig, attach_residual_projection, begin_task, end_task, protected_basis
from keeplora_hf.models import build_tiny
from keeplora_hf.tuner.statistics import default_loss, input_feature_pass, output_gradient_pass, weight_gradient_pass
from keeplora_hf.subspace import principal_basis, squared_singular_values
from keeplora_hf.tuner.state import KeepLoRALayerState
from peft import PeftModel

from keeplora_setups import outputs, targets, wrap


def _tuner_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "keeplora_state")}


def test_output_gradients_reproduce_autograd_weight_gradients():
    """The hook-based pass sees exactly the (input, output-gradient) pairs whose products are the weight gradients."""
    model, batches, _ = wrap("llava")
    layers = _tuner_layers(model)
    network = model
    exact: dict[str, torch.Tensor] = {}
    weight_gradient_pass(network, layers, batches, default_loss,
                         lambda n, g: exact.__setitem__(n, exact[n] + g if n in exact else g.clone()), description="")
    from_pairs: dict[str, torch.Tensor] = {}

    def pair(name, x, g):
        product = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        from_pairs[name] = from_pairs[name] + product if name in from_pairs else product

    assert output_gradient_pass(network, layers, batches, default_loss, pair, description="") == len(batches)
    assert set(from_pairs) == set(exact) == set(layers)
    for name in layers:
        assert torch.allclose(from_pairs[name], exact[name], atol=1e-6, rtol=1e-4), name
    # nothing was left behind: no parameter requires or holds a gradient it did not have before
    assert all(m.get_base_layer().weight.grad is None and not m.get_base_layer().weight.requires_grad for m in layers.values())


def test_sketch_pass_never_makes_base_weights_require_grad():
    model, batches, _ = wrap("qwen2_vl")
    seen = []

    def watching_loss(m, batch):
        seen.append(any(p.requires_grad for p in m.parameters()))
        return default_loss(m, batch)

    begin_task(model, batches, loss_fn=watching_loss)
    assert seen and not any(seen)


@pytest.mark.parametrize("name", ["llava", "clip"])
def test_sketch_as_wide_as_each_output_equals_the_exact_estimate(name):
    """With r + oversampling >= d_out the sketch is the gradient itself: the same A as the exact path."""
    starts = {}
    for estimator in ("exact", "sketch"):
        model, batches, _ = wrap(name, gradient_estimator=estimator, sketch_oversampling=128, principal_energy=0.3)
        begin_task(model, batches)
        starts[estimator] = {n: m.lora_A["default"].weight.detach().double() for n, m in targets(model).items()}
    for layer, exact in starts["exact"].items():
        sketched = starts["sketch"][layer]
        assert torch.allclose(sketched.T @ sketched, exact.T @ exact, atol=1e-4), layer


def test_feature_pass_stops_after_the_last_target_and_gathers_the_same_statistics():
    model, batches, _ = wrap("llava")
    layers = _tuner_layers(model)
    head = model.get_base_model().lm_head
    runs = {}
    for stop_early in (False, True):
        calls = []
        handle = head.register_forward_hook(lambda *_: calls.append(1))
        stats: dict[str, torch.Tensor] = {}
        groups: list[tuple[str, ...]] = []

        def on_input(names, x):
            rows = x.reshape(-1, x.shape[-1]).double()
            stats[names[0]] = stats.get(names[0], 0) + rows.T @ rows
            groups.append(names)

        count, shared = input_feature_pass(model, layers, batches, default_loss, on_input, description="",
                                           stop_early=stop_early)
        handle.remove()
        runs[stop_early] = (stats, shared, len(calls))
        assert count == len(batches)
        # each tensor is handed over once, with every target it feeds: the group's first and those sharing it
        assert len(groups) == count * len(set(layers) - set(shared))
        assert all(shared.get(name) == names[0] for names in groups for name in names[1:])
        assert all(len(names) == 1 + sum(owner == names[0] for owner in shared.values()) for names in groups)
    assert runs[False][2] == len(batches) and runs[True][2] == 1  # only the first batch ran the head
    assert runs[True][1] == runs[False][1]
    assert all(torch.equal(runs[True][0][n], runs[False][0][n]) for n in runs[False][0])


@pytest.mark.parametrize("keep_principal_basis", [False, True])
def test_state_keeps_the_narrower_basis_and_stays_exact(keep_principal_basis):
    """The default stores the narrower of the protected subspace and its complement (+ the p principal energies);
    keep_principal_basis=True the principal basis and the narrower of the memory and the complement."""
    model, batches, _ = wrap("llava", principal_energy=0.3, keep_principal_basis=keep_principal_basis)
    for task in range(2):
        begin_task(model, batches)
        end_task(model, batches)
    used_complement = False
    for name, module in targets(model).items():
        state = module.keeplora_state["default"]
        d, p, m = state.d_in, state.principal_rank, state.memory_rank
        if keep_principal_basis:
            assert state.stored_values() == d * (p + min(m, d - p - m)), name
            assert (state.complement is not None) == (m > d - p - m)
        else:
            complemented = p + m > d - p - m
            assert state.stored_values() == d * min(p + m, d - p - m) + (p if complemented else 0), name
            assert (state.complement is not None) == complemented
            assert (state.stored_principal is None) == complemented
        used_complement |= state.complement is not None
        protected = protected_basis(model, name).double()
        assert protected.shape == (d, p + m)
        assert torch.allclose(protected.T @ protected, torch.eye(p + m, dtype=torch.float64), atol=1e-5)
        if state.stored_principal is not None:  # else protected_basis is the complement's complement, in no order
            assert torch.allclose(state.principal.double(), protected[:, :p])
        rows = torch.randn(3, d, dtype=torch.float64)
        expected = rows - rows @ protected @ protected.T
        assert torch.allclose(state.subspace().project_out(rows), expected, atol=1e-5)
    assert used_complement


def test_bfloat16_state_halves_storage_and_keeps_A_in_the_stored_subspace(tmp_path):
    model, batches, _ = wrap("llava", state_dtype="bfloat16", principal_energy=0.3)
    begin_task(model, batches)
    end_task(model, batches)
    begin_task(model, batches)
    for name, module in targets(model).items():
        state = module.keeplora_state["default"]
        stored = (state.stored_principal, state.memory, state.complement)
        assert all(t.dtype == torch.bfloat16 for t in stored if t is not None)
        lora_A = module.lora_A["default"].weight
        # exact for the subspace that is stored: A is orthogonal to its (re-orthonormalised) basis ...
        assert (state.subspace().project_onto(lora_A.float())).abs().max() < 1e-5, name
        # ... which is the stored bfloat16 columns' span, to bfloat16's precision
        assert (lora_A @ protected_basis(model, name).float()).abs().max() < 2e-2, name
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    bases = [k for k in saved if k.endswith(("keeplora_state.principal", "keeplora_state.memory", "keeplora_state.complement"))]
    assert bases and all(saved[k].dtype == torch.bfloat16 for k in bases if saved[k].ndim == 2)
    assert all(saved[k].dtype == torch.float64 for k in bases if saved[k].ndim == 1)  # the p principal energies
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model, tmp_path, is_trainable=True)
    assert torch.equal(outputs(reloaded, batches[0]), outputs(model, batches[0]))


def test_adapters_saved_with_the_full_memory_basis_still_load(tmp_path):
    """The layout before narrower-basis storage (principal + memory, whatever their width) loads and continues."""
    model, batches, _ = wrap("llava", keep_principal_basis=True)
    begin_task(model, batches)
    end_task(model, batches)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    converted = 0
    for name, module in targets(model).items():
        key = f"{name}.keeplora_state"
        if f"{key}.complement" in tensors:
            del tensors[f"{key}.complement"]
            tensors[f"{key}.memory"] = module.keeplora_state["default"].memory.contiguous()
            converted += 1
    assert converted
    tensors["keeplora_state.checksum"] = state_checksum(tensors)  # a crafted file, not a corrupted one
    save_file(tensors, path)
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model, tmp_path, is_trainable=True)
    for m in (model, reloaded):
        torch.manual_seed(0)
        begin_task(m, batches)
        end_task(m, batches)
    for (name, a), (_, b) in zip(targets(model).items(), targets(reloaded).items()):
        pa, pb = protected_basis(model, name).double(), protected_basis(reloaded, name).double()
        assert torch.allclose(pa @ pa.T, pb @ pb.T, atol=1e-5), name
        assert b.keeplora_state["default"].stored_values() == a.keeplora_state["default"].stored_values()

    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("keeplora_state.memory"))
    tensors[key.removesuffix("memory") + "complement"] = tensors[key][:, :1].clone()
    tensors["keeplora_state.checksum"] = state_checksum(tensors)  # a crafted file, not a corrupted one
    save_file(tensors, path)
    with pytest.raises(ValueError, match="both a memory and a complement"):
        PeftModel.from_pretrained(build_tiny("llava").model, tmp_path)


def test_a_kept_principal_basis_is_dropped_for_its_energies_once_the_default_applies(tmp_path):
    """An adapter that kept its principal bases (keep_principal_basis=True, or saved before the field existed, when
    that was the default), continued with the default: each layer that stores its complement drops its basis for the
    energies it measures, the original weight's top squared singular values, even from a bfloat16 basis."""
    model, batches, _ = wrap("llava", keep_principal_basis=True, state_dtype="bfloat16")
    originals = {n: m.get_base_layer().weight.detach().clone() for n, m in targets(model).items()}
    begin_task(model, batches)
    end_task(model, batches)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["keep_principal_basis"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model, tmp_path, is_trainable=True)
    states = {n: m.keeplora_state["default"] for n, m in targets(reloaded).items()}
    kept = {n for n, s in states.items() if s.complement is not None and s.stored_principal is not None}
    assert kept and all(s.principal_energies is None for s in states.values())
    begin_task(reloaded, batches)
    end_task(reloaded, batches)
    for name, state in states.items():
        if state.complement is None:
            continue
        assert state.stored_principal is None, name
        expected = squared_singular_values(originals[name])[: state.principal_rank]
        assert (state.principal_energies - expected).abs().max() < 1e-5 * expected[0], name
    assert kept <= {n for n, s in states.items() if s.complement is not None}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gradient_estimator", "full", "gradient_estimator must be one of"),
        ("principal_solver", "lanczos", "principal_solver must be one of"),
        ("memory_solver", "fd", "memory_solver must be one of"),
        ("state_dtype", "int8", "state_dtype must be one of"),
        ("sketch_oversampling", -1, "sketch_oversampling must be a non-negative integer"),
        ("sketch_oversampling", 2.5, "sketch_oversampling must be a non-negative integer"),
        ("keep_principal_basis", "no", "keep_principal_basis must be a bool"),
    ],
)
def test_new_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        KeepLoRAConfig(r=4, target_modules=["q_proj"], **{field: value})


def test_defaults_are_the_scalable_paths():
    config = KeepLoRAConfig(r=4, target_modules=["q_proj"])
    assert (config.gradient_estimator, config.principal_solver, config.memory_solver, config.state_dtype) == (
        "sketch", "gram", "randomized", "auto"
    )


def test_dropping_the_principal_basis_stores_min_k_and_recomputes_it_exactly(tmp_path):
    """keep_principal_basis=False: min(k, d_in - k) * d_in values (+ p energies); the principal basis is a function of
    the original weight and comes back the same, after training and after a save/load round trip."""
    model, batches, tiny = wrap("llava", keep_principal_basis=False, principal_energy=0.6)
    originals = {n: m.get_base_layer().weight.detach().clone() for n, m in targets(model).items()}
    for task in (batches[:2], batches[1:]):
        begin_task(model, task)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        model(**task[0]).loss.backward()
        optimizer.step()
        end_task(model, task)
    complemented = 0
    for name, module in targets(model).items():
        state = module.keeplora_state["default"]
        d, k = state.d_in, state.protected_rank
        assert state.stored_values() <= min(k, d - k) * d + state.principal_rank, name
        if state.complement is None:
            continue
        complemented += 1
        assert state.stored_principal is None
        expected = principal_basis(originals[name], 0.6).float()
        principal = state.principal.float()
        assert principal.shape == expected.shape
        assert torch.allclose(principal @ principal.T, expected @ expected.T, atol=1e-5), name
        protected = protected_basis(model, name).double()
        assert (principal.double().T @ (torch.eye(d, dtype=torch.float64) - protected @ protected.T)).abs().max() < 1e-5
        assert state.memory.shape[1] == state.memory_rank
    assert complemented
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(v.ndim == 1 for k, v in saved.items() if k.endswith("keeplora_state.principal"))
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model, tmp_path, is_trainable=True)
    assert torch.equal(outputs(reloaded, batches[0]), outputs(model, batches[0]))
    for (name, a), (_, b) in zip(targets(model).items(), targets(reloaded).items()):
        sa, sb = a.keeplora_state["default"], b.keeplora_state["default"]
        assert torch.equal(sa.principal, sb.principal) and torch.equal(sa.memory, sb.memory), name
    for m in (model, reloaded):
        torch.manual_seed(0)
        begin_task(m, batches)
        end_task(m, batches)
    assert torch.equal(outputs(reloaded, batches[2]), outputs(model, batches[2]))


@pytest.mark.parametrize("train_lora_A", [False, True])
def test_training_with_the_default_config_never_recomputes_the_principal_basis(tmp_path, monkeypatch, train_lora_A):
    """By default a layer keeps only its complement once k > d_in - k; recomputing its principal basis costs an SVD
    of the layer, so begin_task, training (with A re-projected every step), end_task, saving, reloading and the
    next task must never ask for it."""

    def refuse(self):
        raise AssertionError("the training path recomputed a principal basis")

    monkeypatch.setattr(KeepLoRALayerState, "_recomputed_principal", refuse)
    model, batches, _ = wrap("llava", train_lora_A=train_lora_A)
    assert model.peft_config["default"].keep_principal_basis is False
    layouts = []
    for task in (batches[:2], batches[1:]):
        begin_task(model, task)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        attach_residual_projection(optimizer, model)  # a trained A must be re-projected (end_task refuses otherwise)
        for batch in task:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        end_task(model, task)
        states = [m.keeplora_state["default"] for m in targets(model).values()]
        layouts.append(sum(s.complement is not None and s.stored_principal is None for s in states))
    assert layouts[0] and layouts[1] >= layouts[0]  # the second task ran on complement-only states
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model, tmp_path, is_trainable=True)
    begin_task(reloaded, batches)
    end_task(reloaded, batches)
    assert reloaded.base_model.progress("default").task_index == 3


def test_a_wrong_base_model_is_caught_when_the_principal_basis_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPLORA_TRUST_BASE", "1")  # past the load-time fingerprint check, to the deeper guard
    model, batches, _ = wrap("llava", keep_principal_basis=False)
    begin_task(model, batches)
    end_task(model, batches)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_tiny("llava", seed=1).model, tmp_path)
    state = next(s for s in (m.keeplora_state["default"] for m in targets(reloaded).values()) if s.complement is not None)
    with pytest.raises(RuntimeError, match="not those the state was built on"):
        state.principal
