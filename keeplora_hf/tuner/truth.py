"""end_task's truth check: over a task, a layer may change by its learned update `s B A` and by nothing else.

`learned_update` and the saved adapter describe the finished task from `A` and `B` alone. Anything else that changes a
layer during the task (a PEFT merge in the middle of it, a base weight left trainable, a cast of the base, a forward
hook added to the layer) would make them report something the model does not compute. So `begin_task` records each
target's frozen response, its base weight on two fixed random directions (`weights.weight_response`), and the forward
hooks on the layer; `end_task` measures them again and refuses, naming the layer and the gap, before changing anything.
The response is saved with the adapter (`task_probe`), so a resumed task is checked too; hooks are checked within a
process only. Beside it: `A` must still lie in the residual subspace at end_task, and finished tasks merged into a
float32 weight must not have been rounded by a cast since (checked at begin_task).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from ..sharding import full_value
from .layer import BRANCH_HOOKS, layer_state
from .state import KeepLoRALayerState
from .state_sharding import Owners, owns
from .weights import fingerprint_probes, merges_exactly, weight_response

#: a layer's frozen response may move by this share of the learned update's response (float32 rounding of the
#: products), plus `RESPONSE_TOLERANCE` of its own size
UPDATE_TOLERANCE = 1e-3
RESPONSE_TOLERANCE = 1e-6


def record_frozen_response(module: LoraLayer, state: KeepLoRALayerState) -> None:
    """At begin_task: the layer's base response and its foreign forward hooks (every rank calls it: a gather)."""
    state.task_probe = weight_response(module)
    state.task_hooks = foreign_hooks(module)


def response_gap(module: LoraLayer, adapter: str, state: KeepLoRALayerState) -> float | None:
    """How far the layer's frozen part moved over the task, relative to the learned update's response on the same
    directions (None: no response was recorded, e.g. a task begun by an older version)."""
    if state.task_probe is None:
        return None
    now = weight_response(module)
    before = state.task_probe.to(now.device)
    lora_A = full_value(module.lora_A[adapter].weight).float()  # gathered when sharded: every rank calls this
    lora_B = full_value(module.lora_B[adapter].weight).float()
    probes = fingerprint_probes(module.get_base_layer().in_features, now.device)
    learned = float(module.scaling[adapter]) * (lora_B @ (lora_A @ probes))
    floor = UPDATE_TOLERANCE * learned.norm() + RESPONSE_TOLERANCE * before.norm()
    moved = (now - before).norm()
    return 0.0 if moved <= floor else float(moved / learned.norm().clamp_min(1e-30))


def check_unchanged(module: LoraLayer, name: str, adapter: str, state: KeepLoRALayerState) -> None:
    """Refuse to finish a task during which something other than `A` and `B` changed the layer `name`."""
    gap = response_gap(module, adapter, state)
    if gap:
        raise RuntimeError(
            f"end_task: the base weight of {name} changed during the task by {gap:.3g}x the learned update (on fixed "
            "random directions), so what learned_update and the saved adapter would report is not what the layer "
            "computes. Something other than lora_B (and lora_A with train_lora_A) changed it: merge_adapter() in "
            "the middle of the task, a base weight left trainable, a cast of the model's dtype. The task is still "
            "under way and nothing was changed; resume from the last checkpoint saved before the change."
        )
    hooks = foreign_hooks(module)
    if state.task_hooks is not None and hooks != state.task_hooks:
        added = sorted(set(hooks) - set(state.task_hooks)) or sorted(set(state.task_hooks) - set(hooks))
        raise RuntimeError(
            f"end_task: the forward hooks of {name} changed during the task ({', '.join(added)}), so the layer no "
            "longer computes its base plus the learned update. Remove the hook (or add it before begin_task); the "
            "task is still under way and nothing was changed."
        )


def foreign_hooks(module: LoraLayer) -> tuple[str, ...]:
    """The forward (pre-)hooks on the target and its base layer other than KeepLoRA's own, by name and id."""
    found = []
    for layer in (module, module.get_base_layer()):
        for registry in (layer._forward_pre_hooks, layer._forward_hooks):
            for key, hook in registry.items():
                if getattr(hook, "__func__", hook) not in BRANCH_HOOKS:
                    found.append(f"{getattr(hook, '__qualname__', type(hook).__name__)}#{key}")
    return tuple(found)


def check_lora_A_in_residual(
    layers: dict[str, LoraLayer], adapter: str, owners: Owners | None, trained: bool
) -> None:
    """`A` must still lie in the residual subspace: re-projected after every step when it trains, untouched when it
    does not. Refuse to keep a task whose `A` left it. Each layer is checked by its owner and the worst share is
    shared, so every rank refuses alike."""
    worst = (0.0, "")  # (|A P| / |A|, layer) of the worst layer this rank checked
    for name, module in layers.items():
        lora_A = full_value(module.lora_A[adapter].weight).float()  # a gather when sharded: every rank joins
        if owns(owners, name) and lora_A.norm() > 0:
            share = float(layer_state(module, adapter).subspace().project_onto(lora_A).norm() / lora_A.norm())
            worst = max(worst, (share, name))
    if owners is not None:
        everyone: list[tuple[float, str] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, worst)
        worst = max(everyone)
    share, name = worst
    if share > 1e-4 and not trained:
        raise RuntimeError(
            f"lora_A of {name} left its residual subspace during the task (|A P| / |A| = {share:.2g}), although "
            "train_lora_A is False: something changed it (a cast of its dtype, an optimizer given lora_A, "
            "set_requires_grad). The task is still under way and nothing was changed; resume from the last checkpoint "
            "saved before the change, or set train_lora_A=True to train A with its projection."
        )
    if share > 1e-4:
        raise RuntimeError(
            f"lora_A of {name} left its residual subspace (|A P| / |A| = {share:.2g}): with "
            "train_lora_A=True every optimizer step must re-project it. Call "
            "keeplora_hf.attach_residual_projection(optimizer, model) once in a custom loop (KeepLoRATrainer and "
            "KeepLoRACallback do it). The task is still under way and nothing was changed."
        )


def refuse_stale_merges(layers: dict[str, LoraLayer], adapter: str) -> None:
    """A layer whose LoRA is merged (`merge_adapter()`) would train a `B` the forward does not use, and unmerge
    later what was never merged; finished tasks merged into a float32 weight that was cast since to a 16-bit dtype were
    rounded with it: either way the model would not compute what `learned_update` reports."""
    for name, module in layers.items():
        if module.merged:
            raise RuntimeError(
                f"{name} has its LoRA merged into the base weight (merge_adapter()): a task trained now would not be "
                "what the layer computes. Call model.unmerge_adapter() first."
            )
        state = layer_state(module, adapter)
        if state.merged_tasks and not merges_exactly(module):
            dtype = module.get_base_layer().weight.dtype
            raise RuntimeError(
                f"{name} has {state.merged_tasks} finished tasks merged into its base weight, which is now {dtype}: the "
                "cast rounded them, so the model no longer computes the updates KeepLoRA reports. Reload the base in "
                "float32 with the saved adapter (PeftModel.from_pretrained), or train on a 16-bit base from the start "
                "(finished tasks then stay a float32 branch)."
            )
