"""The guarantee under PEFT's whole surface: every PEFT call on a KeepLoRA model keeps it, or is refused with the fix.

Each test here failed before the change it guards (the items of the issue "The guarantee under the whole PEFT
surface"). Lifecycle tests run over `device` and over float32 and bfloat16 bases.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

from keeplora_hf import KeepLoRAConfig, begin_task, end_task, learned_update, protected_basis
from keeplora_hf.tuner.layer import NO_TASK_WARNING

from keeplora_hf.models import build_tiny

from keeplora_setups import all_targets, learn, outputs, targets, wrap

DTYPES = [torch.float32, torch.bfloat16]
LEAK_BOUND = 1e-4


def _bases(model) -> dict[str, torch.Tensor]:
    """Each target's protected basis in force now (call it while the task is under way)."""
    return {name: protected_basis(model, name) for name in targets(model)}


def _leak(model, bases: dict[str, torch.Tensor]) -> float:
    """The largest share of the first task's finished update inside the protected subspace in force during it."""
    worst = 0.0
    for name in targets(model):
        delta = learned_update(model, name)
        if delta.norm() > 0:
            worst = max(worst, float((delta @ bases[name].to(delta)).norm() / delta.norm()))
    return worst


def _task(model, batches) -> None:
    begin_task(model, batches)
    learn(model, batches)
    end_task(model, batches)


# -- 1. which lora_A trains -----------------------------------------------------------------------------------------


def test_train_lora_A_never_makes_an_inactive_or_frozen_adapter_trainable(tmp_path):
    model, batches, tiny = wrap("llava", train_lora_A=True)
    model.add_adapter("other", KeepLoRAConfig(r=4, lora_alpha=8, target_modules=all_targets(tiny), train_lora_A=True))
    other = [p for n, p in model.named_parameters() if ".other." in n]
    assert other and not any(p.requires_grad for p in other)

    begin_task(model, batches)
    end_task(model, batches)
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(build_tiny("llava").model, tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(RuntimeError, match="is_trainable=True"):  # begin_task would make it trainable
        begin_task(frozen, batches)
    assert not any(p.requires_grad for p in frozen.parameters())


# -- 2, 3. add_weighted_adapter ---------------------------------------------------------------------------------------


def test_add_weighted_adapter_is_refused_with_the_export_route():
    model, batches, _ = wrap("llava", dtype=torch.bfloat16)
    _task(model, batches)
    with pytest.raises(NotImplementedError, match="export_lora"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="cat")
    assert "combined" not in model.peft_config


# -- 4. mixed-adapter batches -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_adapter_batch_gives_each_row_its_own_finished_tasks(device, dtype):
    model, batches, _ = wrap("llava", dtype=dtype, device=device, finished_tasks="branch")
    _task(model, batches)
    model.eval()
    batch = batches[0]
    adapted = outputs(model, batch)
    with model.disable_adapter():
        pretrained = outputs(model, batch)
    assert not torch.equal(adapted, pretrained)
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], adapted[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1], pretrained[1], rtol=0, atol=0)


def test_mixed_adapter_batch_is_refused_where_tasks_are_merged_into_the_weight():
    model, batches, _ = wrap("llava")  # float32: finished tasks merge into the weight
    _task(model, batches)
    model.eval()
    with pytest.raises(ValueError, match="finished_tasks='branch'"):
        with torch.no_grad():
            model(**batches[0], adapter_names=["default", "__base__"])


# -- 5. initialisations ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [False, "gaussian", "pissa", "olora"])
def test_other_initialisations_are_refused(init):
    with pytest.raises(ValueError, match="init_lora_weights"):
        KeepLoRAConfig(r=4, target_modules=["q_proj"], init_lora_weights=init)


# -- 6. PEFT calls in the middle of a task -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.merge_adapter(),
        lambda m: m.merge_and_unload(),
        lambda m: m.unload(),
        lambda m: m.set_adapter("other"),
        lambda m: m.delete_adapter("default"),
    ],
    ids=["merge_adapter", "merge_and_unload", "unload", "set_adapter", "delete_adapter"],
)
def test_calls_that_would_break_a_task_under_way_are_refused(call):
    model, batches, tiny = wrap("llava")
    model.add_adapter("other", KeepLoRAConfig(r=4, lora_alpha=8, target_modules=all_targets(tiny)))
    begin_task(model, batches)
    bases = _bases(model)
    learn(model, batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="end_task"):
        call(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.active_adapters == ["default"]
    end_task(model, batches)  # the task finishes as if nothing had been tried
    assert _leak(model, bases) <= LEAK_BOUND


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_adapter_added_mid_task_keeps_the_guarantee(device, dtype):
    model, batches, tiny = wrap("llava", dtype=dtype, device=device)
    begin_task(model, batches)
    bases = _bases(model)
    learn(model, batches)
    model.add_adapter("other", KeepLoRAConfig(r=4, lora_alpha=8, target_modules=all_targets(tiny)))
    learn(model, batches)
    end_task(model, batches)
    assert _leak(model, bases) <= LEAK_BOUND


def test_a_task_on_a_merged_adapter_is_refused_until_unmerged():
    model, batches, _ = wrap("llava")
    _task(model, batches)
    model.merge_adapter()  # between tasks: allowed (A = B = 0), but the next task would train an unused B
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        begin_task(model, batches)
    model.unmerge_adapter()
    begin_task(model, batches)


def test_merge_after_end_task_computes_what_the_adapter_did():
    model, batches, _ = wrap("llava")
    _task(model, batches)
    expected = outputs(model, batches[0])
    merged = model.merge_and_unload()
    torch.testing.assert_close(outputs(merged, batches[0]), expected, rtol=1e-5, atol=1e-5)


# -- the truth check at end_task -----------------------------------------------------------------------------------------


def _first_target(model):
    return next(iter(targets(model).items()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_end_task_refuses_a_layer_merged_behind_its_back(device, dtype):
    model, batches, _ = wrap("llava", dtype=dtype, device=device)
    begin_task(model, batches)
    learn(model, batches)
    name, module = _first_target(model)
    module.merge()  # a layer-level merge that no tuner call sees
    module.unmerge = None  # type: ignore[assignment]
    module.merged_adapters = []  # as if PEFT forgot it: the layer now adds the update twice
    with pytest.raises(RuntimeError, match=rf"base weight of {name} changed during the task by"):
        end_task(model, batches)
    assert model.base_model.progress("default").in_task  # nothing was changed


def test_end_task_refuses_a_base_weight_left_trainable(device):
    model, batches, _ = wrap("llava", device=device)
    begin_task(model, batches)
    name, module = _first_target(model)
    module.get_base_layer().weight.requires_grad_(True)
    learn(model, batches)
    with pytest.raises(RuntimeError, match=name):
        end_task(model, batches)


def test_end_task_refuses_a_hook_added_during_the_task():
    model, batches, _ = wrap("llava")
    begin_task(model, batches)
    name, module = _first_target(model)

    def nudge(layer, args, output):
        return output * 1.01

    module.register_forward_hook(nudge)
    learn(model, batches)
    with pytest.raises(RuntimeError, match=rf"forward hooks of {name} changed.*nudge"):
        end_task(model, batches)


def test_the_truth_check_survives_a_save_and_load_mid_task(tmp_path):
    model, batches, tiny = wrap("llava")
    begin_task(model, batches)
    learn(model, batches)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model, tmp_path, is_trainable=True)
    name, module = _first_target(reloaded)
    module.get_base_layer().weight.data.add_(1e-2)
    with pytest.raises(RuntimeError, match=name):
        end_task(reloaded, batches)


def _cast(model, batches, dtype: torch.dtype) -> list[dict]:
    """`model.to(dtype)` as a user would, and the batches' floating inputs with it."""
    model.to(dtype)
    return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()} for b in batches]


# -- 7. dtype casts --------------------------------------------------------------------------------------------------------


def test_a_cast_after_wrapping_keeps_the_factors_float32_and_the_guarantee(device):
    model, batches, _ = wrap("llava", device=device)
    batches = _cast(model, batches, torch.bfloat16)
    factors = [p for n, p in model.named_parameters() if "lora_" in n]
    assert factors and all(p.dtype == torch.float32 for p in factors)
    begin_task(model, batches)
    for name, module in targets(model).items():
        lora_A = module.lora_A["default"].weight
        share = (lora_A @ protected_basis(model, name).to(lora_A)).norm() / lora_A.norm().clamp_min(1e-30)
        assert share <= 1e-5, name
    bases = _bases(model)
    learn(model, batches)
    end_task(model, batches)
    assert _leak(model, bases) <= LEAK_BOUND


def test_a_float32_base_cast_after_its_tasks_merged_is_refused_at_the_next_task():
    model, batches, _ = wrap("llava")
    _task(model, batches)
    batches = _cast(model, batches, torch.bfloat16)
    with pytest.raises(RuntimeError, match="merged into its base weight, which is now torch.bfloat16"):
        begin_task(model, batches)


def test_a_cast_in_the_middle_of_a_task_is_refused_at_end_task():
    model, batches, _ = wrap("llava")
    begin_task(model, batches)
    learn(model, batches)
    batches = _cast(model, batches, torch.bfloat16)
    with pytest.raises(RuntimeError, match="changed during the task"):
        end_task(model, batches)


# -- 9. training with no task under way ------------------------------------------------------------------------------------


def test_training_without_a_task_warns_with_the_fix():
    model, batches, _ = wrap("llava")
    model.train()
    with pytest.warns(UserWarning, match="begin_task"):
        model(**batches[0]).loss.backward()
    begin_task(model, batches)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=NO_TASK_WARNING[:40])
        model(**batches[0]).loss.backward()


def test_begin_task_refuses_statistics_whose_gradient_is_zero():
    model, batches, _ = wrap("llava")
    before = outputs(model, batches[0])
    with pytest.raises(ValueError, match="gradient is exactly zero"):
        begin_task(model, batches, loss_fn=lambda m, b: m(**b).logits.sum() * 0.0)
    assert torch.equal(outputs(model, batches[0]), before)
    assert not model.base_model.progress("default").in_task


# -- 10. launch order under FSDP2 ------------------------------------------------------------------------------------------


def test_get_peft_model_on_a_model_already_fully_sharded_is_refused(tmp_path):
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        tiny = build_tiny("llava")
        for layer in tiny.model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(tiny.model)
        config = KeepLoRAConfig(r=4, target_modules=all_targets(tiny))
        with pytest.raises(ValueError, match="get_peft_model on the whole model first, then fully_shard"):
            get_peft_model(tiny.model, config)
    finally:
        dist.destroy_process_group()


# -- hooks owned by the layer state -----------------------------------------------------------------------------------------


def _hooked_modules(model) -> list[str]:
    """Modules that still carry a KeepLoRA hook."""
    from keeplora_hf.tuner.layer import BRANCH_HOOKS

    return [
        name
        for name, module in model.named_modules()
        for registry in (module._forward_pre_hooks, module._forward_hooks)
        if any(getattr(hook, "__func__", hook) in BRANCH_HOOKS for hook in registry.values())
    ]


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
def test_unloading_leaves_no_keeplora_hook_on_the_base_layers(unload):
    model, batches, _ = wrap("llava", dtype=torch.bfloat16)
    _task(model, batches)
    assert _hooked_modules(model)
    base = getattr(model, unload)()
    assert not _hooked_modules(base)
    assert all("_keeplora" not in key for m in base.modules() for key in m.__dict__)  # no per-call state left behind


def test_deleting_the_last_adapter_of_a_layer_removes_its_hooks():
    model, batches, tiny = wrap("llava")
    model.add_adapter("other", KeepLoRAConfig(r=4, lora_alpha=8, target_modules=tiny.language_targets))
    model.delete_adapter("default")
    hooked = _hooked_modules(model)
    assert hooked and not any("vision_tower" in name for name in hooked)  # the tower's layers had "default" only
