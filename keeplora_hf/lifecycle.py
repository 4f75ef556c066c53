"""One task's life under KeepLoRA++, in the order of ALGORITHM.md: begin (bases, gradient, A), train B, end (merge, memory)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .statistics import LossFn, all_reduce_sum_, default_loss, input_feature_pass, task_batches, weight_gradient_pass
from .subspace import FeatureStatistics, extend_memory, principal_basis, project_out, residual_directions
from .tuner.config import KeepLoRAConfig
from .tuner.layer import FinishedTask, KeepLoRALayerState, apply_delta_, layer_state
from .tuner.model import KeepLoRAModel, TaskProgress, _tuner_of, keeplora_layers

logger = logging.getLogger(__name__)

BASIS_DTYPE = torch.float32


def _context(model: nn.Module) -> tuple[KeepLoRAModel, str, KeepLoRAConfig, dict[str, LoraLayer]]:
    model = getattr(model, "module", model)  # DistributedDataParallel and friends
    tuner = _tuner_of(model)
    adapter = tuner.keeplora_adapter()
    return tuner, adapter, tuner.peft_config[adapter], keeplora_layers(model, adapter)


def protected_basis(model: nn.Module, module_name: str) -> torch.Tensor:
    """The orthonormal `(d_in, k)` basis the current task's updates of `module_name` must avoid.

    It is the principal subspace of the pre-trained weight joined with the feature memory of finished tasks.
    """
    _, adapter, _, layers = _context(model)
    if module_name not in layers:
        raise KeyError(f"{module_name!r} is not a KeepLoRA target; targets are named like {next(iter(layers), '')!r}")
    return layer_state(layers[module_name], adapter).protected()


def begin_task(
    model: nn.Module, dataloader: Iterable[Any], *, max_batches: int | None = None, loss_fn: LossFn = default_loss
) -> None:
    """Start a task: principal bases (first task only), gradient estimate, `A` from the residual gradient, `B = 0`.

    The model's function is unchanged by this call. Nothing is modified if the data pass fails.
    """
    tuner, adapter, config, layers = _context(model)
    progress = tuner.progress(adapter)
    if progress.in_task:
        raise RuntimeError(f"begin_task: task {progress.task_index} is already under way; call end_task first")
    network = getattr(model, "module", model)

    for module in layers.values():
        with torch.no_grad():
            module.lora_A[adapter].weight.zero_()
            module.lora_B[adapter].weight.zero_()
    gradients = _mean_gradients(network, layers, dataloader, config, max_batches, loss_fn)

    cramped: dict[str, int] = {}
    for name, module in layers.items():
        state = layer_state(module, adapter)
        weight = module.get_base_layer().weight
        if state.principal is None:
            state.principal = principal_basis(weight, config.principal_energy).to(BASIS_DTYPE)
            state.memory = torch.zeros(weight.shape[1], 0, dtype=BASIS_DTYPE, device=weight.device)
        protected = state.protected()
        rank = module.r[adapter]
        if weight.shape[1] - protected.shape[1] < rank:
            cramped[name] = weight.shape[1] - protected.shape[1]
        rows = _initial_rows(config.lora_A_init, gradients.pop(name, None), weight, protected, rank)
        lora_A = module.lora_A[adapter].weight
        with torch.no_grad():
            lora_A.copy_(rows.to(lora_A.dtype))
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


def _mean_gradients(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    dataloader: Iterable[Any],
    config: KeepLoRAConfig,
    max_batches: int | None,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """Mean loss gradient of every target weight over the task's first batches (summed across ranks)."""
    if config.lora_A_init != "residual_gradient":
        return {}
    gradients: dict[str, torch.Tensor] = {}

    def accumulate(name: str, grad: torch.Tensor) -> None:
        if name in gradients:
            gradients[name].add_(grad.float())
        else:
            gradients[name] = grad.detach().float().clone()

    batches = task_batches(dataloader, config.gradient_data_ratio, max_batches)
    count = weight_gradient_pass(model, layers, batches, loss_fn, accumulate, description="KeepLoRA gradient estimate")
    if count == 0:
        raise ValueError("begin_task: the dataloader yielded no batches")
    missing = sorted(set(layers) - set(gradients))
    if missing:
        raise RuntimeError(f"begin_task: the loss does not depend on these targets, so no gradient reached them: {missing[:5]}")
    device = next(iter(gradients.values())).device
    total = float(all_reduce_sum_(torch.tensor([float(count)], device=device)).item())
    return {name: all_reduce_sum_(gradients[name]) / total for name in layers}


def _initial_rows(
    init: str, gradient: torch.Tensor | None, weight: torch.Tensor, protected: torch.Tensor, rank: int
) -> torch.Tensor:
    """The rows of `A` for a new task, always inside the residual subspace of `protected`."""
    if init == "residual_gradient":
        return residual_directions(gradient, protected, rank)
    if init == "minor_singular":
        _, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        rows = vh[-rank:]
    else:  # "random": LoRA's own initialisation of A
        rows = torch.empty(rank, weight.shape[1], dtype=torch.float64, device=weight.device)
        nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
    return project_out(rows, protected.double())


def end_task(
    model: nn.Module, dataloader: Iterable[Any], *, max_batches: int | None = None, loss_fn: LossFn = default_loss
) -> None:
    """Finish a task: merge `s * B @ A` into the base weights, grow the feature memory, reset LoRA.

    The feature statistics are gathered before anything is merged (with LoRA active, which computes the merged
    function), so a failing data pass leaves the model and its state untouched.
    """
    tuner, adapter, config, layers = _context(model)
    progress = tuner.progress(adapter)
    if not progress.in_task:
        raise RuntimeError("end_task called before begin_task: there is no task under way to finish")
    network = getattr(model, "module", model)

    new_memory = {name: layer_state(module, adapter).memory for name, module in layers.items()}
    if config.feature_energy > 0:  # with no memory to keep (plain sequential LoRA), skip the data pass
        covariances = _task_feature_covariances(network, layers, dataloader, config, max_batches, loss_fn)
        for name, module in layers.items():
            state = layer_state(module, adapter)
            new_memory[name] = extend_memory(state.memory, state.principal, covariances[name], config.feature_energy)

    for name, module in layers.items():
        _finish_layer(module, adapter, layer_state(module, adapter), new_memory[name].to(BASIS_DTYPE))
    tuner.keeplora_progress[adapter] = TaskProgress(progress.task_index + 1, in_task=False)
    logger.info("KeepLoRA: finished task %d", progress.task_index)


def _task_feature_covariances(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    dataloader: Iterable[Any],
    config: KeepLoRAConfig,
    max_batches: int | None,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    stats = {name: FeatureStatistics(m.get_base_layer().in_features, m.get_base_layer().weight.device) for name, m in layers.items()}
    batches = task_batches(dataloader, config.gradient_data_ratio, max_batches)
    if config.feature_source == "activations":
        count, shared = input_feature_pass(
            model, layers, batches, loss_fn, lambda name, x: stats[name].update(x), description="KeepLoRA feature memory"
        )
    else:
        count = weight_gradient_pass(
            model,
            layers,
            batches,
            loss_fn,
            lambda name, grad: stats[name].update_covariance(grad.double().T @ grad.double()),
            description="KeepLoRA feature memory",
        )
        shared = {}
    if count == 0:
        raise ValueError("end_task: the dataloader yielded no batches")
    owners = {name: shared.get(name, name) for name in layers}
    for name, owner in owners.items():  # in module order: every rank must reduce the same tensors in the same order
        if owner == name:
            all_reduce_sum_(stats[name].covariance)
    return {name: stats[owner].covariance for name, owner in owners.items()}


def _finish_layer(module: LoraLayer, adapter: str, state: KeepLoRALayerState, memory: torch.Tensor) -> None:
    lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    task = FinishedTask(lora_A.detach().float().clone(), lora_B.detach().float().clone(), float(module.scaling[adapter]))
    with torch.no_grad():
        apply_delta_(module.get_base_layer().weight, task.delta())
        lora_A.zero_()
        lora_B.zero_()
    state.tasks.append(task)
    state.memory = memory


def project_lora_A_(model: nn.Module) -> None:
    """Put every trainable `A` back into its residual subspace: `A <- A (I - P P^T)`.

    Called after each optimizer step, this keeps `A P = 0` exactly under any optimizer, AdamW included, where
    projecting only the gradient would not.
    """
    _, adapter, _, layers = _context(model)
    with torch.no_grad():
        for module in layers.values():
            lora_A = module.lora_A[adapter].weight
            if lora_A.requires_grad:
                protected = layer_state(module, adapter).protected()
                lora_A.copy_(project_out(lora_A.float(), protected.to(lora_A.device)).to(lora_A.dtype))


def attach_residual_projection(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Make `optimizer.step()` re-project trainable `A`s; returns the hook handle. For custom training loops."""
    return optimizer.register_step_post_hook(lambda *_: project_lora_A_(model))
