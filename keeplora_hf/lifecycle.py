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

from .feature_memory import feature_covariances
from .sharding import assign_, full_value, is_partitioned, local_value, zero_
from .statistics import (
    LossFn,
    all_reduce_sum_,
    default_loss,
    layer_seed,
    output_gradient_pass,
    task_batches,
    weight_gradient_pass,
)
from .subspace import GradientSketch, Subspace, memory_directions, principal_basis, residual_directions
from .tuner.config import KeepLoRAConfig, state_torch_dtype
from .tuner.layer import layer_state, set_layer_state
from .tuner.model import LAYER_CACHE_ATTR, TaskProgress, keeplora_context, keeplora_layers, tuner_of
from .tuner.state import FinishedTask, KeepLoRALayerState, merged_delta
from .tuner.weights import base_weight, is_quantized, merges_exactly, weight_fingerprint

logger = logging.getLogger(__name__)


def protected_basis(model: nn.Module, module_name: str) -> torch.Tensor:
    """The orthonormal `(d_in, k)` basis the current task's updates of `module_name` must avoid.

    It is the principal subspace of the pre-trained weight joined with the feature memory of finished tasks, exactly
    as the projections see it (a basis stored in 16 bits comes back re-orthonormalised, in float32).
    """
    _, adapter, _, layers = keeplora_context(model)
    if module_name not in layers:
        raise KeyError(f"{module_name!r} is not a KeepLoRA target; targets are named like {next(iter(layers), '')!r}")
    return layer_state(layers[module_name], adapter).protected()


def learned_update(model: nn.Module, module_name: str) -> torch.Tensor:
    """The float32 update `sum_t s_t B_t A_t` (`d_out x d_in`) of the finished tasks of `module_name`.

    It is what the layer adds to its pre-trained weight, whether the tasks were merged into it or act as a frozen
    branch (see `finished_tasks`); zeros before the first task has ended.
    """
    _, adapter, _, layers = keeplora_context(model)
    if module_name not in layers:
        raise KeyError(f"{module_name!r} is not a KeepLoRA target; targets are named like {next(iter(layers), '')!r}")
    module = layers[module_name]
    tasks = layer_state(module, adapter).tasks
    if not tasks:
        base = module.get_base_layer()
        return torch.zeros(base.out_features, base.in_features, device=base.weight.device)
    return merged_delta(tasks)


def begin_task(
    model: nn.Module, dataloader: Iterable[Any], *, max_batches: int | None = None, loss_fn: LossFn = default_loss
) -> None:
    """Start a task: principal bases (first task only), gradient estimate, `A` from the residual gradient, `B = 0`.

    The model's function is unchanged by this call. Nothing is modified if the data pass fails.
    """
    tuner, adapter, config, layers = keeplora_context(model)
    progress = tuner.progress(adapter)
    if progress.in_task:
        raise RuntimeError(f"begin_task: task {progress.task_index} is already under way; call end_task first")
    network = getattr(model, "module", model)

    for module in layers.values():
        zero_(module.lora_A[adapter].weight)
        zero_(module.lora_B[adapter].weight)
    # the first task computes each layer's principal basis; it is installed only once the data pass has succeeded
    states: dict[str, KeepLoRALayerState] = {}
    fresh: set[str] = set()
    for name, module in layers.items():
        state = layer_state(module, adapter)
        if not state.initialised:
            state = first_task_state(module, config)
            fresh.add(name)
        state.bind(module, config.principal_solver)
        states[name] = state
    directions = _gradient_directions(
        network, layers, adapter, states, dataloader, config, progress.task_index, max_batches, loss_fn
    )

    cramped: dict[str, int] = {}
    for name, module in layers.items():
        state = states[name]
        rank = module.r[adapter]
        room = module.get_base_layer().in_features - state.protected_rank
        if room < rank:
            cramped[name] = room
        if name in fresh:
            set_layer_state(module, adapter, state)
        rows = _initial_rows(config.lora_A_init, directions.pop(name, None), module, state.subspace(), rank)
        lora_A = module.lora_A[adapter].weight
        assign_(lora_A, rows)
        lora_A.requires_grad_(config.train_lora_A)
        module.lora_B[adapter].weight.requires_grad_(True)
    if cramped:
        shown = ", ".join(f"{name} ({dim})" for name, dim in list(cramped.items())[:5])
        warnings.warn(
            f"{len(cramped)} target layers have a residual subspace smaller than r, so the missing rows of their lora_A "
            f"are zero and they learn with a lower rank: {shown}{', ...' if len(cramped) > 5 else ''}. Lower "
            "principal_energy or feature_energy to give them more room.",
            stacklevel=2,
        )
    progress.in_task = True
    logger.info("KeepLoRA: began task %d on %d target layers", progress.task_index, len(layers))


def first_task_state(module: LoraLayer, config: KeepLoRAConfig, energy: float | None = None) -> KeepLoRALayerState:
    """A layer's state before its first task: the principal basis of its pre-trained weight holding `energy` of its
    energy (default `principal_energy`), an empty memory, and the weight's fingerprint."""
    weight = base_weight(module)
    energy = config.principal_energy if energy is None else energy
    principal, energies = principal_basis(weight, energy, solver=config.principal_solver, return_energies=True)
    dtype = state_torch_dtype(config, module)
    state = KeepLoRALayerState(
        principal.to(dtype), principal.new_zeros(principal.shape[0], 0).to(dtype), principal_energies=energies
    )
    state.fingerprint = weight_fingerprint(weight)
    return state


def _gradient_directions(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    adapter: str,
    states: dict[str, KeepLoRALayerState],
    dataloader: Iterable[Any],
    config: KeepLoRAConfig,
    task_index: int,
    max_batches: int | None,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """Rows of `A` for every target from the task's mean loss gradient (summed across ranks), inside its residual."""
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
        sketches = {
            name: GradientSketch(
                m.get_base_layer().out_features,
                m.get_base_layer().in_features,
                m.r[adapter],
                config.sketch_oversampling,
                seed=layer_seed(task_index, index),
                device=m.get_base_layer().weight.device,
            )
            for index, (name, m) in enumerate(layers.items())
        }
        received = set()

        def update(name: str, inputs: torch.Tensor, grad: torch.Tensor) -> None:
            sketches[name].update(inputs, grad)
            received.add(name)

        count = output_gradient_pass(model, layers, batches, loss_fn, update, description=description)
    if count == 0:
        raise ValueError("begin_task: the dataloader yielded no batches")
    missing = sorted(set(layers) - received)
    if missing:
        raise RuntimeError(f"begin_task: the loss does not depend on these targets, so no gradient reached them: {missing[:5]}")
    directions = {}
    for name, module in layers.items():  # in module order: every rank must reduce the same tensors in the same order
        rank = module.r[adapter]
        subspace = states[name].subspace()
        if config.gradient_estimator == "exact":
            gradient = all_reduce_sum_(gradients.pop(name))  # the mean's scale does not move singular vectors
            _check_finite(gradient, name, "gradient")
            directions[name] = residual_directions(gradient, subspace, rank)
        else:
            sketch = sketches.pop(name)
            all_reduce_sum_(sketch.sketch)
            _check_finite(sketch.sketch, name, "gradient sketch")
            directions[name] = sketch.residual_directions(subspace, rank)
    return directions


def _check_finite(statistic: torch.Tensor, name: str, what: str) -> None:
    if not torch.isfinite(statistic).all():
        raise ValueError(
            f"the {what} of {name} holds NaN/inf: the task's inputs or activations are not finite there (check the "
            "data and the model's dtype range). Nothing was changed."
        )


def _initial_rows(
    init: str, directions: torch.Tensor | None, module: LoraLayer, protected: Subspace, rank: int
) -> torch.Tensor:
    """The rows of `A` for a new task, always inside the residual subspace of `protected`."""
    if init == "residual_gradient":
        return directions
    if init == "minor_singular":
        _, _, vh = torch.linalg.svd(base_weight(module).double(), full_matrices=False)
        rows = vh[-rank:]
    else:  # "random": LoRA's own initialisation of A
        base = module.get_base_layer()
        rows = torch.empty(rank, base.in_features, dtype=torch.float64, device=base.weight.device)
        nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
    return protected.project_out(rows)


def end_task(
    model: nn.Module, dataloader: Iterable[Any], *, max_batches: int | None = None, loss_fn: LossFn = default_loss
) -> None:
    """Finish a task: keep `s * B @ A` as a finished task (merged or as a frozen branch), grow the memory, reset LoRA.

    The feature statistics are gathered before anything is merged (with LoRA active, which computes the merged
    function), so a failing data pass leaves the model and its state untouched.
    """
    tuner, adapter, config, layers = keeplora_context(model)
    progress = tuner.progress(adapter)
    if not progress.in_task:
        raise RuntimeError("end_task called before begin_task: there is no task under way to finish")
    merge = {name: _merges(config, module, name) for name, module in layers.items()}  # refused before any change
    if config.train_lora_A:
        _check_lora_A_in_residual(layers, adapter)

    new_directions: dict[str, torch.Tensor] = {}
    if config.feature_energy > 0:  # with no memory to keep (plain sequential LoRA), skip the data pass
        covariances = feature_covariances(model, dataloader, max_batches=max_batches, loss_fn=loss_fn)
        for name, covariance in covariances.items():
            _check_finite(covariance, name, "feature covariance")
        for index, (name, module) in enumerate(layers.items()):
            new_directions[name] = memory_directions(
                covariances[name],
                layer_state(module, adapter).subspace(),
                config.feature_energy,
                solver=config.memory_solver,
                seed=layer_seed(progress.task_index, index),
            )

    for name, module in layers.items():
        _finish_layer(
            module, adapter, layer_state(module, adapter), new_directions.get(name), state_torch_dtype(config, module),
            config.keep_principal_basis,
            merge=merge[name],
        )
    tuner.keeplora_progress[adapter] = TaskProgress(progress.task_index + 1, in_task=False)
    logger.info("KeepLoRA: finished task %d", progress.task_index)


def _check_lora_A_in_residual(layers: dict[str, LoraLayer], adapter: str) -> None:
    """A trained `A` must have been re-projected after every step; refuse to keep a task whose `A` left the residual."""
    for name, module in layers.items():
        lora_A = full_value(module.lora_A[adapter].weight).float()
        inside = layer_state(module, adapter).subspace().project_onto(lora_A).norm()
        if inside > 1e-4 * lora_A.norm():
            raise RuntimeError(
                f"lora_A of {name} left its residual subspace (|A P| / |A| = {float(inside / lora_A.norm()):.2g}): with "
                "train_lora_A=True every optimizer step must re-project it. Call "
                "keeplora_hf.attach_residual_projection(optimizer, model) once in a custom loop (KeepLoRATrainer and "
                "KeepLoRACallback do it). The task is still under way and nothing was changed."
            )


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
    new_memory: torch.Tensor | None,
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
    if new_memory is None:
        state.cast_(dtype)
    else:
        state.add_memory(new_memory, dtype, keep_principal=keep_principal)


def project_lora_A_(model: nn.Module) -> None:
    """Put every trainable `A` back into its residual subspace: `A <- A (I - P P^T)`.

    Called after each optimizer step, this keeps `A P = 0` exactly under any optimizer, AdamW included, where
    projecting only the gradient would not.
    """
    adapter, layers = _projected_layers(model)
    with torch.no_grad():
        for module in layers:
            weight = module.lora_A[adapter].weight
            if not weight.requires_grad:
                continue
            subspace = layer_state(module, adapter).subspace()  # cached: the basis (or complement) in float32
            if is_partitioned(weight):  # ZeRO-3: gathered, projected, written back with its float32 master
                assign_(weight, subspace.project_out(full_value(weight).float()))
                continue
            lora_A = local_value(weight)  # its rows: sharded by FSDP2, each rank its own
            if lora_A.dtype == torch.float32:
                subspace.project_out_(lora_A)
            else:  # half-precision weights: project in float32, round once
                lora_A.copy_(subspace.project_out(lora_A.float()).to(lora_A.dtype))


def _projected_layers(model: nn.Module) -> tuple[str, list[LoraLayer]]:
    """The active adapter and its target layers, cached on the tuner: `project_lora_A_` runs after every step."""
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    cache = tuner.__dict__.setdefault(LAYER_CACHE_ATTR, {})
    layers = cache.get(adapter)
    if layers is None or not all(adapter in m.lora_A for m in layers):
        layers = cache[adapter] = list(keeplora_layers(tuner.model, adapter).values())
    return adapter, layers


def attach_residual_projection(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Make `optimizer.step()` re-project trainable `A`s; returns the hook handle. For custom training loops."""
    return optimizer.register_step_post_hook(lambda *_: project_lora_A_(model))
