"""One task's life under KeepLoRA++, in the order of docs/method.md: begin (bases, gradient, A), train B, end (keep, memory)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..process_group import all_reduce_sum_
from ..sharding import assign_, full_value, zero_
from ..subspace import (
    GradientSketch,
    MemoryGrowth,
    Subspace,
    grow_memory,
    principal_basis,
    residual_directions,
)
from ..subspace.basis import EXACT_DTYPES, WORK_DTYPE
from ..subspace.sketch import SketchMatrices
from .autocast import full_precision
from .config import KeepLoRAConfig, state_torch_dtype
from .context import TaskContext, task_context
from .feature_memory import feature_covariances
from .finished import FinishedTask, merged_delta
from .layer import layer_state, set_layer_state
from .model import TaskProgress
from .state import KeepLoRALayerState
from .state_sharding import (
    adopt_owners_layouts_,
    complete_from_owners,
    from_owner,
    join_weight_gather,
)
from .statistics import (
    LossFn,
    check_adapter_finite,
    check_finite,
    default_loss,
    layer_seed,
    output_gradient_pass,
    task_batches,
    weight_gradient_pass,
)
from .statistics_inputs import no_batches_error
from .truth import (
    check_lora_A_in_residual,
    check_unchanged,
    record_frozen_response,
    refuse_stale_merges,
)
from .weights import base_weight, is_quantized, merges_exactly, weight_fingerprint

logger = logging.getLogger(__name__)


@full_precision
def protected_basis(model: nn.Module, module_name: str) -> torch.Tensor:
    """The orthonormal `(d_in, k)` basis the current task's updates of `module_name` must avoid.

    It is the principal subspace of the pre-trained weight joined with the feature memory of finished tasks, exactly
    as the projections see it (a basis stored in 16 bits comes back re-orthonormalised, in float32). When the state is
    sharded by layer (a fully sharded base, see `tuner/state_sharding.py`) it comes from the layer's owner: every rank
    must then call this, in the same order.
    """
    ctx = task_context(model)
    state = ctx.state(_target(ctx, module_name))
    if ctx.owners is None or not state.initialised:
        return state.protected()
    stored = state.stored_principal if state.stored_principal is not None else state.complement  # `meta` if not held
    dtype = stored.dtype if stored.dtype in EXACT_DTYPES else WORK_DTYPE  # as `protected()` returns it
    shape = (state.d_in, state.protected_rank)
    basis = state.protected() if ctx.owns(module_name) else None
    device = ctx.layers[module_name].get_base_layer().weight.device
    return from_owner(basis, shape, dtype, device, ctx.owners[module_name])


@full_precision
def learned_update(model: nn.Module, module_name: str) -> torch.Tensor:
    """The float32 update `sum_t s_t B_t A_t` (`d_out x d_in`) of the finished tasks of `module_name`.

    It is what the layer adds to its pre-trained weight, whether the tasks were merged into it or act as a frozen
    branch (see `finished_tasks`); zeros before the first task has ended.
    """
    ctx = task_context(model)
    tasks = ctx.state(_target(ctx, module_name)).tasks
    if not tasks:
        base = ctx.layers[module_name].get_base_layer()
        return torch.zeros(base.out_features, base.in_features, device=base.weight.device)
    return merged_delta(tasks)


def _target(ctx: TaskContext, name: str) -> str:
    if name not in ctx.layers:
        raise KeyError(f"{name!r} is not a KeepLoRA target; targets are named like {next(iter(ctx.layers), '')!r}")
    return name


@full_precision
def begin_task(
    model: nn.Module, dataloader: Iterable[Any], *, max_batches: int | None = None, loss_fn: LossFn = default_loss
) -> None:
    """Start a task: principal bases (first task only), gradient estimate, `A` from the residual gradient, `B = 0`.

    The model's function is unchanged by this call. Nothing is modified if the data pass fails.
    """
    ctx = task_context(model)
    progress = ctx.progress
    if progress.in_task:
        raise RuntimeError(f"begin_task: task {progress.task_index} is already under way; call end_task first")
    if ctx.config.inference_mode:
        raise RuntimeError(
            f"begin_task: adapter {ctx.adapter!r} was loaded for inference (is_trainable=False), so its weights are "
            "frozen; load it with PeftModel.from_pretrained(base, path, is_trainable=True) to continue the sequence"
        )
    refuse_stale_merges(ctx.layers, ctx.adapter)
    ctx.release_unowned()
    for module in ctx.layers.values():
        zero_(module.lora_A[ctx.adapter].weight)
        zero_(module.lora_B[ctx.adapter].weight)
    # 1. the principal subspace of each pre-trained weight (first task), installed once the data pass has succeeded
    fresh = _first_task_states(ctx)
    states = {name: fresh[name] if name in fresh else ctx.state(name) for name in ctx.layers}
    for name, state in states.items():
        state.bind(ctx.layers[name], ctx.config.principal_solver, ctx.config.principal_side)
    # 2. the task's gradient, and its top directions inside each layer's residual subspace
    directions = _gradient_directions(ctx, states, dataloader, max_batches, loss_fn)
    for name, state in fresh.items():
        set_layer_state(ctx.layers[name], ctx.adapter, state)
    # 3. A from those directions (B = 0: the model's function is unchanged)
    _install_lora_A(ctx, states, directions)
    for module in ctx.layers.values():
        state = layer_state(module, ctx.adapter)
        record_frozen_response(module, state)
        state.task_open = True
    progress.in_task = True
    logger.info("KeepLoRA: began task %d on %d target layers", progress.task_index, len(ctx.layers))
    if ctx.config.modules_to_save:
        logger.warning(
            "KeepLoRA: task %d also trains modules_to_save %s fully, outside any protected subspace",
            progress.task_index,
            sorted(ctx.config.modules_to_save),
        )


def _install_lora_A(
    ctx: TaskContext, states: dict[str, KeepLoRALayerState], directions: dict[str, torch.Tensor]
) -> None:
    """Each target's `A` inside its residual subspace (computed by the layer's owner, sent to every rank), trainable
    only with `train_lora_A`; `B` trainable. Warns about layers whose residual is narrower than `r`."""
    cramped: dict[str, int] = {}
    for name, module in ctx.layers.items():
        state, rank, base = states[name], module.r[ctx.adapter], module.get_base_layer()
        if base.in_features - state.protected_rank < rank:
            cramped[name] = base.in_features - state.protected_rank
        # every rank joins the weight's gather that the owner's minor_singular rows need
        weight = base_weight(module) if ctx.config.lora_A_init == "minor_singular" else None
        rows = None
        if ctx.owns(name):
            rows = _initial_rows(ctx.config.lora_A_init, directions.pop(name, None), module, weight, state.subspace(), rank)
        if ctx.owners is not None:
            rows = from_owner(rows, (rank, base.in_features), torch.float64, base.weight.device, ctx.owners[name])
        lora_A = module.lora_A[ctx.adapter].weight
        assign_(lora_A, rows)
        lora_A.requires_grad_(ctx.config.train_lora_A)
        module.lora_B[ctx.adapter].weight.requires_grad_(True)
    if cramped:
        shown = ", ".join(f"{name} ({dim})" for name, dim in list(cramped.items())[:5])
        warnings.warn(
            f"{len(cramped)} target layers have a residual subspace smaller than r, so the missing rows of their lora_A "
            f"are zero and they learn with a lower rank: {shown}{', ...' if len(cramped) > 5 else ''}. Lower "
            "principal_energy or feature_energy to give them more room.",
            stacklevel=3,
        )


def _first_task_states(ctx: TaskContext) -> dict[str, KeepLoRALayerState]:
    """The first-task state of each layer that has none: computed by its owner (every rank joins the gather of a
    sharded weight), a stand-in of the owner's shapes elsewhere."""
    fresh: dict[str, KeepLoRALayerState | None] = {}
    for name, module in ctx.layers.items():
        if ctx.state(name).initialised:
            continue
        if ctx.owns(name):
            fresh[name] = first_task_state(module, ctx.config)
        else:
            join_weight_gather(module)
            fresh[name] = None
    return complete_from_owners(fresh, ctx.owners)


def first_task_state(module: LoraLayer, config: KeepLoRAConfig, energy: float | None = None) -> KeepLoRALayerState:
    """A layer's state before its first task: the principal basis of its pre-trained weight holding `energy` of its
    energy (default `principal_energy`), an empty memory, and the weight's fingerprint."""
    weight = base_weight(module)
    energy = config.principal_energy if energy is None else energy
    principal, energies = principal_basis(
        weight, energy, solver=config.principal_solver, side=config.principal_side, return_energies=True
    )
    dtype = state_torch_dtype(config, module)
    state = KeepLoRALayerState(
        principal.to(dtype), principal.new_zeros(principal.shape[0], 0).to(dtype), principal_energies=energies
    )
    state.fingerprint = weight_fingerprint(weight)
    return state


def _gradient_directions(
    ctx: TaskContext,
    states: dict[str, KeepLoRALayerState],
    dataloader: Iterable[Any],
    max_batches: int | None,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """Rows of `A` for every target this rank owns from the task's mean loss gradient (summed across ranks), inside
    its residual."""
    model, layers, adapter, config, task_index = ctx.network, ctx.layers, ctx.adapter, ctx.config, ctx.progress.task_index
    if config.lora_A_init != "residual_gradient":
        return {}
    batches = task_batches(dataloader, config.gradient_data_ratio, max_batches)
    description = "KeepLoRA gradient estimate"
    if config.gradient_estimator == "exact":
        gradients: dict[str, torch.Tensor] = {}

        def accumulate(name: str, grad: torch.Tensor) -> None:
            if name in gradients:
                gradients[name].add_(grad.float())
            else:
                gradients[name] = grad.detach().float().clone()

        count = weight_gradient_pass(model, layers, batches, loss_fn, accumulate, description=description)
        received = set(gradients)
    else:
        shared = SketchMatrices(layer_seed(task_index, len(layers)))
        sketches = {
            name: GradientSketch(
                m.get_base_layer().out_features,
                m.get_base_layer().in_features,
                m.r[adapter],
                config.sketch_oversampling,
                seed=layer_seed(task_index, index),
                device=m.get_base_layer().weight.device,
                shared=shared,
            )
            for index, (name, m) in enumerate(layers.items())
        }
        received = set()

        def update(name: str, inputs: torch.Tensor, grad: torch.Tensor) -> None:
            sketches[name].update(inputs, grad)
            received.add(name)

        count = output_gradient_pass(model, layers, batches, loss_fn, update, description=description)
    if count == 0:
        raise no_batches_error("begin_task")
    missing = sorted(set(layers) - received)
    if missing:
        raise RuntimeError(f"begin_task: the loss does not depend on these targets, so no gradient reached them: {missing[:5]}")
    directions, silent = {}, []
    for name, module in layers.items():  # in module order: every rank must reduce the same tensors in the same order
        rank = module.r[adapter]
        if config.gradient_estimator == "exact":
            gradient = all_reduce_sum_(gradients.pop(name))  # the mean's scale does not move singular vectors
            check_finite(gradient, name, "gradient")
            if not gradient.any():
                silent.append(name)
            if ctx.owns(name):
                directions[name] = residual_directions(gradient, states[name].subspace(), rank)
        else:
            sketch = sketches.pop(name)
            all_reduce_sum_(sketch.sketch)
            check_finite(sketch.sketch, name, "gradient sketch")
            if not sketch.sketch.any():
                silent.append(name)
            if ctx.owns(name):
                directions[name] = sketch.residual_directions(states[name].subspace(), rank)
    if len(silent) == len(layers):
        raise ValueError(
            f"begin_task: the loss's gradient is exactly zero at every target layer over {count} batches, so A would "
            "be chosen from nothing. Check that the batches' labels are not all ignored (-100) and that the loss "
            "depends on the model's outputs (loss_fn). Nothing was changed."
        )
    return directions


def _initial_rows(
    init: str,
    directions: torch.Tensor | None,
    module: LoraLayer,
    weight: torch.Tensor | None,
    protected: Subspace,
    rank: int,
) -> torch.Tensor:
    """The rows of `A` for a new task, always inside the residual subspace of `protected` (`weight`: the base weight,
    for `minor_singular`)."""
    if init == "residual_gradient":
        return directions
    if init == "minor_singular":
        _, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        rows = vh[-rank:]
    else:  # "random": LoRA's own initialisation of A
        base = module.get_base_layer()
        rows = torch.empty(rank, base.in_features, dtype=torch.float64, device=base.weight.device)
        nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
    return protected.project_out(rows)


@full_precision
def end_task(
    model: nn.Module, dataloader: Iterable[Any], *, max_batches: int | None = None, loss_fn: LossFn = default_loss
) -> None:
    """Finish a task: keep `s * B @ A` as a finished task (merged or as a frozen branch), grow the memory, reset LoRA.

    The feature statistics are gathered before anything is merged (with LoRA active, which computes the merged
    function), so a failing data pass leaves the model and its state untouched.
    """
    ctx = task_context(model)
    progress, adapter, config, layers = ctx.progress, ctx.adapter, ctx.config, ctx.layers
    if not progress.in_task:
        raise RuntimeError("end_task called before begin_task: there is no task under way to finish")
    merge = {name: _merges(config, module, name) for name, module in layers.items()}  # refused before any change
    ctx.release_unowned()
    # the task's update must be what the layers compute: finite, A in the residual, nothing else changed
    check_adapter_finite(layers, adapter, "end_task")
    check_lora_A_in_residual(layers, adapter, ctx.owners, config.train_lora_A)
    for name, module in layers.items():
        check_unchanged(module, name, adapter, ctx.state(name))
    # 1. the task's feature statistics, gathered before anything is merged, and the memory's growth: all of it before
    # any layer changes, so a failure leaves the task open and every layer as it was
    growth: dict[str, MemoryGrowth] = {}
    if config.feature_energy > 0:  # with no memory to keep (plain sequential LoRA), skip the data pass
        covariances = feature_covariances(model, dataloader, max_batches=max_batches, loss_fn=loss_fn, context=ctx)
        for index, name in enumerate(layers):
            if ctx.owns(name):
                grown = grow_memory(
                    covariances[name],
                    ctx.state(name).subspace(),
                    config.feature_energy,
                    solver=config.memory_solver,
                    seed=layer_seed(progress.task_index, index),
                )
                dtype = state_torch_dtype(config, layers[name])  # what stays unprotected is held as it will be stored
                growth[name] = grown._replace(remaining=None if grown.remaining is None else grown.remaining.to(dtype))
    # 2. keep s B A (merged or as a frozen branch), grow the memory, reset LoRA
    for name, module in layers.items():
        dtype = state_torch_dtype(config, module)
        _finish_layer(
            module, adapter, ctx.state(name), growth.get(name), dtype, config.keep_principal_basis,
            merge=merge[name],
        )
    adopt_owners_layouts_(layers, adapter, ctx.owners)
    for name in layers:
        state = ctx.state(name)
        state.task_open, state.task_probe, state.task_hooks = False, None, None
    ctx.tuner.keeplora_progress[adapter] = TaskProgress(progress.task_index + 1, in_task=False)
    logger.info("KeepLoRA: finished task %d", progress.task_index)


def _merges(config: KeepLoRAConfig, module: LoraLayer, name: str) -> bool:
    """Whether `end_task` merges this layer's finished tasks into its base weight (see `finished_tasks`)."""
    if config.finished_tasks == "auto":
        return merges_exactly(module)
    if config.finished_tasks == "merge" and is_quantized(module):
        raise ValueError(
            f"finished_tasks='merge' cannot write into the quantized base weight of {name}; use 'auto' or 'branch'"
        )
    return config.finished_tasks == "merge"


def _finish_layer(
    module: LoraLayer,
    adapter: str,
    state: KeepLoRALayerState,
    growth: MemoryGrowth | None,
    dtype: torch.dtype,
    keep_principal: bool,
    *,
    merge: bool,
) -> None:
    lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    task = FinishedTask(
        full_value(lora_A).float().clone(), full_value(lora_B).float().clone(), float(module.scaling[adapter])
    )
    zero_(lora_A)
    zero_(lora_B)
    state.add_task(task)
    if merge:
        state.merge_into_base_(module)
    if growth is None:
        state.cast_(dtype)
    else:
        state.add_memory(growth.directions, dtype, keep_principal=keep_principal, remaining=growth.remaining)
