"""Passes over a task's data that collect what the subspace math needs, through hooks on the target layers.

Only per-layer statistics are kept, never a copy of the model:

- `output_gradient_pass` hands each target's input rows and output gradient to a callback (the gradient sketch); no
  weight gradient is ever formed and base weights never require grad.
- `weight_gradient_pass` (the exact path) lets autograd form each target's full weight gradient, folds it into its
  statistic and frees it as soon as it is produced.
- `input_feature_pass` runs forward only, and stops each batch's forward once the last target has seen its input.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from ..constants import IGNORE_INDEX
from ..process_group import all_reduce_sum_
from ..sharding import is_fully_sharded, is_partitioned, local_value
from .layer import abandon_branch_calls
from .statistics_inputs import checked_loss

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """`model(**batch).loss`, with an error that says what to do when the batch carries no labels."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches must be dicts of model inputs, got {type(batch).__name__}; or pass loss_fn")
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss: give the batches `labels` (or `return_loss`), or pass loss_fn")
    return loss


def task_batches(dataloader: Iterable, ratio: float, max_batches: int | None) -> Iterator[Any]:
    """The first `max_batches` batches, or the first `ceil(ratio * len)` when no count is given (every batch when
    `ratio` is 1, which needs no length). Checked when called, so a bad argument is refused before any pass starts."""
    if max_batches is None:
        max_batches = _ratio_of(dataloader, ratio)
    elif isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer, got {max_batches!r}")
    return itertools.islice(dataloader, None if max_batches is None else int(max_batches))


def _ratio_of(dataloader: Iterable, ratio: float) -> int | None:
    """`ceil(ratio * len(dataloader))` batches, or None (all of them) for a ratio of 1 on data of unknown length."""
    try:
        total = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        if ratio >= 1:
            return None
        raise ValueError(
            f"the dataloader ({type(dataloader).__name__}) has no len(), e.g. a DataLoader over an IterableDataset or a "
            f"generator, so gradient_data_ratio={ratio} of its batches cannot be counted: pass max_batches=N (how many "
            "batches the statistics pass uses), or set gradient_data_ratio=1.0 to use every batch it yields. Nothing "
            "was changed."
        ) from None
    return max(1, math.ceil(ratio * total))


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds no NaN/inf. A finite sum proves it (NaN and inf propagate through a sum) in one read-only
    pass, 20x faster than `isfinite` on a 768 x 768 statistic; only a sum that is not finite (a NaN/inf, or finite
    entries overflowing) needs the element-wise check."""
    tensor = tensor.detach()
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(statistic: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """`statistic`, refused if it holds NaN/inf (every rank checks the same summed tensor, so all refuse alike)."""
    if not all_finite(statistic):
        raise ValueError(
            f"the {what} of {name} holds NaN/inf: the task's inputs or activations are not finite there (check the "
            "data and the model's dtype range). Nothing was changed."
        )
    return statistic


def check_adapter_finite(layers: Mapping[str, LoraLayer], adapter: str, caller: str) -> None:
    """Refuse a task whose own LoRA weights hold NaN/inf (a diverged training step), naming the layer, before a data
    pass would blame the task's inputs for what they cause. Each rank checks what it holds of each weight and the
    flags are summed across ranks, so every rank refuses alike."""
    if not layers:
        return
    flags = [
        [not all_finite(_held(module.lora_A[adapter].weight)), not all_finite(_held(module.lora_B[adapter].weight))]
        for module in layers.values()
    ]
    device = next(iter(layers.values())).lora_A[adapter].weight.device
    summed = all_reduce_sum_(torch.tensor(flags, dtype=torch.float32, device=device)).tolist()
    broken = [(name, row) for name, row in zip(layers, summed) if any(row)]
    if broken:
        name, row = broken[0]
        which = " and ".join(weight for weight, flag in zip(("lora_A", "lora_B"), row) if flag)
        raise ValueError(
            f"{caller}: the adapter's own weights of {name} are not finite ({which} holds NaN/inf; {len(broken)} "
            "layer(s) in all): training diverged (too high a learning rate, or a float16 overflow), not the task's "
            "inputs. The task is still under way and nothing was changed: train it again from its last good checkpoint "
            "with a lower learning rate or bfloat16/float32."
        )


def _held(weight: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a weight: its ZeRO-3 partition, its slice of a `DTensor`, else the weight itself."""
    return weight.ds_tensor if is_partitioned(weight) else local_value(weight)


def layer_seed(task_index: int, layer_index: int) -> int:
    """Seed of a layer's random test matrices: the same on every rank, different per task and layer."""
    return 1_000_003 * (task_index + 1) + layer_index


@contextlib.contextmanager
def _frozen_for_statistics(model: nn.Module) -> Iterator[None]:
    """Every parameter frozen and the model in eval mode for a statistics pass; both restored after it, whatever
    happens, and any gradient the pass left on a parameter that did not require one is dropped."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            if not flag:
                p.grad = None
        model.train(was_training)


@contextlib.contextmanager
def _hooked(layers: dict[str, LoraLayer], register: Callable[[str, LoraLayer], RemovableHandle]) -> Iterator[None]:
    """The hooks `register` puts on each target, for the length of a pass: removed after it, whatever happens."""
    handles = []
    try:
        for name, module in layers.items():
            handles.append(register(name, module))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _backward_each(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, description: str) -> int:
    """Backpropagate each batch's loss (the hooks the caller set collect what they need); returns the batch count.

    A batch with nothing supervised (every label -100, e.g. an answer cut off by truncation) has no loss to follow:
    it is skipped with a warning, and refused when no batch is left. Any other non-finite loss is refused.
    """
    device = _model_device(model)
    count = unsupervised = 0
    for batch in tqdm(batches, desc=description, leave=False, disable=not _is_main_process()):
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if torch.is_tensor(labels) and labels.numel() and bool((labels == IGNORE_INDEX).all()):
            unsupervised += 1
            continue
        loss = checked_loss(loss_fn(model, move_to(batch, device)), description)
        if not torch.isfinite(loss.detach()).all():
            raise ValueError(
                f"{description}: batch {count + unsupervised} gives a non-finite loss "
                f"({float(loss.detach().float().mean())}): its inputs or activations hold NaN/inf. Nothing was changed."
            )
        loss.backward()
        count += 1
    if unsupervised:
        if not count:
            raise ValueError(
                f"{description}: every batch has all its labels -100, so there is no loss to take statistics from "
                "(check the collator's masking and max_length). Nothing was changed."
            )
        warnings.warn(
            f"{description}: skipped {unsupervised} of {count + unsupervised} batches whose labels are all -100 "
            "(nothing supervised, e.g. answers cut off by max_length)",
            stacklevel=3,
        )
    return count


def weight_gradient_pass(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    batches: Iterable[Any],
    loss_fn: LossFn,
    on_gradient: Callable[[str, torch.Tensor], None],
    *,
    description: str,
) -> int:
    """Backpropagate each batch's loss to the base weights of `layers` only, handing each gradient to `on_gradient`.

    Every other parameter is frozen for the pass and restored after it, whatever happens. Returns the batch count.
    """
    if is_fully_sharded(model):
        raise NotImplementedError(
            "gradient_estimator='exact' and feature_source='gradients' read each target's whole weight gradient, which "
            "FSDP2 and ZeRO-3 reduce-scatter across ranks; on a sharded model use the default gradient_estimator='sketch' and "
            "feature_source 'activations' or 'mean_gradient' (both from hooks on activations). Nothing was changed."
        )

    def register(name: str, module: LoraLayer) -> RemovableHandle:
        weight = module.get_base_layer().weight
        weight.requires_grad_(True)

        def hook(param: torch.Tensor) -> None:
            on_gradient(name, param.grad)
            param.grad = None

        return weight.register_post_accumulate_grad_hook(hook)

    with _frozen_for_statistics(model), _hooked(layers, register):
        return _backward_each(model, batches, loss_fn, description)


class _OutputGradientTap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands `(layer input, output gradient)` to a callback.

    The layer input is saved for backward, so an in-place change to it before the backward is an autograd error rather
    than a silently wrong statistic. `anchor` is a scalar leaf that requires grad: it makes the output part of the graph
    even when nothing upstream requires grad, so the backward reaches every target and stops below the first one.
    """

    @staticmethod
    def forward(ctx, output, inputs, anchor, callback):  # noqa: ARG004 - anchor only links the graph
        ctx.callback = callback
        ctx.save_for_backward(inputs)
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        (inputs,) = ctx.saved_tensors
        ctx.callback(inputs, grad)
        return grad, None, None, None


def output_gradient_pass(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    batches: Iterable[Any],
    loss_fn: LossFn,
    on_gradient: Callable[[str, torch.Tensor, torch.Tensor], None],
    *,
    description: str,
) -> int:
    """Backpropagate each batch's loss and hand each target's `(input rows, output gradient)` to `on_gradient`.

    Every parameter is frozen for the pass and restored after it, whatever happens; the layers compute what they do in
    training (finished tasks' branches included; the new task's LoRA is zero). The backward computes input gradients only: no
    weight gradient is formed, so the pass costs about one LoRA training step per batch. Returns the batch count.
    """
    anchor = torch.zeros((), device=_model_device(model), requires_grad=True)

    def register(name: str, module: LoraLayer) -> RemovableHandle:
        def callback(inputs: torch.Tensor, grad: torch.Tensor) -> None:
            on_gradient(name, inputs, grad)

        def hook(layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():  # e.g. the first forward of reentrant activation checkpointing
                return output
            x = args[0] if args else kwargs["x"]
            return _OutputGradientTap.apply(output, x, anchor, callback)

        return module.register_forward_hook(hook, with_kwargs=True)

    with _frozen_for_statistics(model), _hooked(layers, register):
        return _backward_each(model, batches, loss_fn, description)


class _StopForward(BaseException):
    """Raised inside a forward once every target has seen its input: the rest of the model is not needed.

    A BaseException, so that a loss function wrapping the model call in `except Exception` does not swallow it.
    """


def _early_exit_is_safe(model: nn.Module) -> bool:
    """Aborting a forward is harmless unless a sharding wrapper gathers parameters in forward hooks (FSDP, ZeRO-3)."""
    return not is_fully_sharded(model) and not any("FullyShardedDataParallel" in type(m).__name__ for m in model.modules())


def input_feature_pass(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    batches: Iterable[Any],
    loss_fn: LossFn,
    on_input: Callable[[tuple[str, ...], torch.Tensor], None],
    *,
    description: str,
    stop_early: bool = True,
) -> tuple[int, dict[str, str]]:
    """Run each batch forward (through `loss_fn`, which knows how to call the model) and hand each distinct input
    tensor to `on_input`, with the targets fed it (in call order: q, k, v share theirs; so do gate and up).

    A group is handed over once it is complete, when the next target is fed another tensor (or the batch's forward
    ends), so the callback knows every target the rows feed; the tensor is held only until then. The returned map sends
    each target that shares its input to the group's first target. Returns the batch count and that map.

    With `stop_early`, once the first batch has shown which target runs last, later batches stop their forward as soon
    as every target has seen its input: the head and the loss (for a LLaVA, the vocabulary projection) are skipped. A
    batch that reaches the last target before all others just runs to the end, so nothing is ever missed; models
    whose targets run more than once per forward, and sharded models (FSDP, ZeRO-3), always run to the end.
    """
    shared: dict[str, str] = {}
    last: dict[str, Any] = {"input": None, "owner": None, "batch": 0, "seen": set(), "calls": 0, "final": None}
    group: list[str] = []
    device = _model_device(model)
    was_training = model.training

    def hand_over() -> None:
        if group:
            on_input(tuple(group), last["input"])
            group.clear()

    def register(name: str, module: LoraLayer) -> RemovableHandle:
        def hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            owner = last["owner"] if x is last["input"] else None
            if last["batch"] == 0 and owner is not None:
                shared[name] = owner
            elif shared.get(name) != owner:
                raise RuntimeError(
                    f"{name} shared its input with {shared.get(name)} in the first batch but not later; "
                    "KeepLoRA's feature statistics assume a fixed routing of inputs to target layers"
                )
            if owner is None:
                hand_over()
                last["input"], last["owner"] = x, name
            group.append(name)
            last["seen"].add(name)
            last["calls"] += 1
            if last["batch"] == 0:
                last["final"] = name
            elif name == last["final"] and len(last["seen"]) == len(layers):
                raise _StopForward

        return module.register_forward_pre_hook(hook, with_kwargs=True)

    count = 0
    try:
        with _hooked(layers, register):
            model.eval()
            with torch.no_grad():
                for batch in tqdm(batches, desc=description, leave=False, disable=not _is_main_process()):
                    try:
                        loss_fn(model, move_to(batch, device))
                    except _StopForward:
                        abandon_branch_calls()
                    hand_over()
                    if last["batch"] == 0 and not (
                        stop_early and last["calls"] == len(layers) == len(last["seen"]) and _early_exit_is_safe(model)
                    ):
                        last["final"] = None  # never stop early
                    last["input"], last["seen"], last["calls"] = None, set(), 0
                    last["batch"] += 1
                    count += 1
    finally:
        group.clear()
        model.train(was_training)
    return count, shared


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
