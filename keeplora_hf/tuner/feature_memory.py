"""The feature statistic `end_task` grows each target's memory from, gathered over the task's data by `feature_source`:
input activations, the task's mean weight gradient (through a co-range sketch), or per-batch weight gradients."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..process_group import all_reduce_sum_
from ..subspace import FeatureStatistics, GradientSketch, ResidualCovariance, ResidualStatistics
from ..subspace.position_mean import PositionMeanStatistics
from ..subspace.sketch import SketchMatrices
from .config import KeepLoRAConfig
from .context import TaskContext, task_context
from .statistics import (
    LossFn,
    check_adapter_finite,
    check_finite,
    default_loss,
    input_feature_pass,
    layer_seed,
    output_gradient_pass,
    task_batches,
    weight_gradient_pass,
)
from .statistics_inputs import no_batches_error

#: keeps the memory sketch's random matrix apart from the gradient sketch's of the same task and layer
_MEMORY_SEED_OFFSET = 500_009


def feature_covariances(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    max_batches: int | None = None,
    loss_fn: LossFn = default_loss,
    context: TaskContext | None = None,
) -> Mapping[str, torch.Tensor]:
    """Each target's `d_in x d_in` feature statistic on the task's data, from which `end_task` grows the memory; for a
    target stored by its complement `R`, where it is cheaper, only `R^T C R` and `trace(C)` (`ResidualCovariance`).

    By `feature_source`: the second moment of the layer's inputs (`activations`; or, by `activation_statistic`, the
    reference CLIP code's `M^T M` of their position-aligned mean `M`); `G^T G` of the task's mean weight
    gradient `G` at the model as it is (`mean_gradient`, sketched); or the sum of per-batch `G_b^T G_b` (`gradients`).
    Summed across data-parallel ranks. `context`: end_task's, when it calls this.
    """
    ctx = context or task_context(model)
    network, adapter, config, layers, task_index = ctx.network, ctx.adapter, ctx.config, ctx.layers, ctx.progress.task_index
    # the reference solver keeps float64 statistics; the fast one float32 (half the time and memory)
    dtype = torch.float64 if config.memory_solver == "eigh" else torch.float32
    if context is None:  # end_task, which passes its context, has checked them already
        check_adapter_finite(layers, adapter, "end_task")
    batches = task_batches(dataloader, config.gradient_data_ratio, max_batches)
    if config.feature_source == "mean_gradient":
        coords = _complements(ctx, layers) if config.memory_solver == "randomized" else {}
        return _mean_gradient_covariances(network, layers, batches, config, task_index, loss_fn, dtype, coords)
    statistic = PositionMeanStatistics if config.activation_statistic == "position_mean" else FeatureStatistics
    if config.feature_source == "activations":
        # the bases are looked up here, not in the forward's hooks (where ZeRO-3 traces every parameter fetch); every rank
        # projects its own rows before the sum, so not with states sharded by layer
        projectable = statistic is FeatureStatistics and config.memory_solver == "randomized" and ctx.owners is None
        statistics = _InputStatistics(layers, statistic, dtype, _complements(ctx, layers) if projectable else {})
        count, _ = input_feature_pass(network, layers, batches, loss_fn, statistics.update, description="KeepLoRA feature memory")
        statistics.cover(layers)
        stats, sources = statistics.stats, statistics.sources
    else:
        stats = {
            name: statistic(m.get_base_layer().in_features, m.get_base_layer().weight.device, dtype=dtype)
            for name, m in layers.items()
        }
        sources = {name: name for name in layers}
        count = weight_gradient_pass(
            network,
            layers,
            batches,
            loss_fn,
            lambda name, grad: stats[name].update_covariance(grad.to(dtype).T @ grad.to(dtype)),
            description="KeepLoRA feature memory",
        )
    if count == 0:
        raise no_batches_error("end_task")
    for name in layers:  # in module order: every rank must reduce the same tensors in the same order
        if sources[name] == name:
            _check_finite(_summed_covariance(stats[name]), name)
    return {name: stats[sources[name]].covariance for name in layers}


class _InputStatistics:
    """The input statistics of the activations pass, chosen per group of targets fed one tensor when the group is first
    seen: one second moment they share, or, where every target of the group is stored by its complement `R` (in
    `complements`) and their projected statistics cost no more per row than the shared one, each its own
    `ResidualStatistics` in `R`'s coordinates (the memory solve then never forms `R^T C R`). A choice of this pass and
    this state alone, so a resumed run makes the same one."""

    def __init__(self, layers: Mapping[str, LoraLayer], statistic: type, dtype: torch.dtype,
                 complements: Mapping[str, torch.Tensor]) -> None:
        self.statistic, self.dtype, self.complements = statistic, dtype, complements
        # read here, before the forward: under ZeRO-3 a weight touched in a hook upsets the parameter fetch trace
        self.inputs = {name: (m.get_base_layer().in_features, m.get_base_layer().weight.device) for name, m in layers.items()}
        self.stats: dict[str, Any] = {}
        self.sources: dict[str, str] = {}  # target -> the target whose statistic it feeds

    def update(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        """Add the rows `x` fed to the targets `names`."""
        if names[0] not in self.sources:
            self._choose(names)
        for name in dict.fromkeys(self.sources[n] for n in names):
            self.stats[name].update(x)

    def cover(self, names: Iterable[str]) -> None:
        """Give a target the data never reached an empty statistic of its own: no memory grows from it."""
        for name in names:
            if name not in self.sources:
                self._choose((name,))

    def _choose(self, names: tuple[str, ...]) -> None:
        if all(name in self.complements for name in names):
            d_in = self.complements[names[0]].shape[0]
            widths = [self.complements[name].shape[1] for name in names]
            cost = sum(ResidualStatistics.multiply_adds_per_row(d_in, width) for width in widths)
            if cost <= FeatureStatistics.multiply_adds_per_row(d_in):
                self.stats |= {name: ResidualStatistics(self.complements[name], self.dtype) for name in names}
                self.sources |= {name: name for name in names}
                return
        d_in, device = self.inputs[names[0]]
        self.stats[names[0]] = self.statistic(d_in, device, dtype=self.dtype)
        self.sources |= {name: names[0] for name in names}


def _complements(ctx: TaskContext, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The complement basis `R` of each held target of `names` whose protected subspace is stored by it."""
    out = {}
    for name in names:
        if ctx.owns(name) and (subspace := ctx.state(name).subspace()).complement:
            out[name] = subspace.stored
    return out


def _check_finite(covariance: torch.Tensor | ResidualCovariance, name: str) -> None:
    for part in covariance if isinstance(covariance, ResidualCovariance) else (covariance,):
        check_finite(part, name, "feature covariance")


def _summed_covariance(
    statistic: FeatureStatistics | PositionMeanStatistics | ResidualStatistics,
) -> torch.Tensor | ResidualCovariance:
    """The statistic summed across data-parallel ranks: the second moment itself (or its projection and trace), or the
    position-aligned sums (and batch counts) that the mean's `M^T M` is formed from."""
    if isinstance(statistic, FeatureStatistics):
        return all_reduce_sum_(statistic.covariance)
    if isinstance(statistic, ResidualStatistics):
        return ResidualCovariance(*(all_reduce_sum_(part) for part in statistic.covariance))
    if statistic.skipped:
        warnings.warn(
            f"activation_statistic='position_mean' left out {statistic.skipped} batch(es) whose row count differs from "
            "the first batch's (the reference drops a short last batch too)",
            stacklevel=3,
        )
    all_reduce_sum_(statistic.batches)
    if statistic.total is not None:
        all_reduce_sum_(statistic.total)
    return statistic.covariance


def _mean_gradient_covariances(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    batches: Iterable[Any],
    config: KeepLoRAConfig,
    task_index: int,
    loss_fn: LossFn,
    dtype: torch.dtype,
    coords: Mapping[str, torch.Tensor],
) -> Mapping[str, torch.Tensor | ResidualCovariance]:
    """`G^T G` of each target's mean weight gradient `G` (the reference LLaVA memory statistic), from hooks; for the
    targets in `coords` (stored by that complement basis `R`), `R^T G^T G R` and its trace (`SketchCovariances`).

    Each target accumulates the co-range sketch `X = Psi G` (`memory_sketch_rows x d_in`, `Psi` with orthonormal rows,
    the identity once the rows reach `d_out`), so `X^T X = G^T Psi^T Psi G`: exactly `G^T G` when the sketch is exact,
    otherwise its compression onto the sketch's rows, which keeps the top input-side directions of `G`. Targets of
    the same output width share one `Psi`.
    """
    shared = SketchMatrices(layer_seed(task_index, len(layers)) + _MEMORY_SEED_OFFSET)
    sketches = {
        name: GradientSketch(
            m.get_base_layer().out_features,
            m.get_base_layer().in_features,
            config.memory_sketch_rows,
            0,
            seed=layer_seed(task_index, index) + _MEMORY_SEED_OFFSET,
            device=m.get_base_layer().weight.device,
            shared=shared,
        )
        for index, (name, m) in enumerate(layers.items())
    }
    count = output_gradient_pass(
        model, layers, batches, loss_fn, lambda name, x, g: sketches[name].update(x, g), description="KeepLoRA feature memory"
    )
    if count == 0:
        raise no_batches_error("end_task")
    reduced = {}
    for name in layers:  # in module order: every rank must reduce the same tensors in the same order
        reduced[name] = check_finite(all_reduce_sum_(sketches.pop(name).sketch), name, "feature covariance")
    return SketchCovariances(reduced, dtype, coords)


class SketchCovariances(Mapping[str, torch.Tensor | ResidualCovariance]):
    """`X^T X` of each target's summed sketch `X`, formed in `dtype` when asked for: one `d_in x d_in` matrix at a
    time, never every target's at once (for LLaVA-1.5-7B's 224 targets that would be 28 GB in float32). For a target
    with a complement basis `R` in `coords`, only `(X R)^T (X R)` and `|X|^2` (`ResidualCovariance`): no `d_in x d_in`
    matrix at all."""

    def __init__(self, sketches: dict[str, torch.Tensor], dtype: torch.dtype, coords: Mapping[str, torch.Tensor]) -> None:
        self._sketches, self._dtype, self._coords = sketches, dtype, coords

    def __getitem__(self, name: str) -> torch.Tensor | ResidualCovariance:
        sketch = self._sketches[name].to(self._dtype)
        if name not in self._coords:
            return sketch.T @ sketch
        statistics = ResidualStatistics(self._coords[name], self._dtype)
        statistics.update(sketch)
        return statistics.covariance

    def __iter__(self) -> Iterator[str]:
        return iter(self._sketches)

    def __len__(self) -> int:
        return len(self._sketches)
