"""A target's base weight: read as a float tensor whatever its storage, identified by a fingerprint, and updated in
place by a finished task's float32 delta (one rounding, also on sharded weights)."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..sharding import full_value, shape_of, update_

#: base-weight dtypes into which a float32 update merges with rounding far below training noise (~1e-7 relative)
EXACT_MERGE_DTYPES = (torch.float32, torch.float64)
#: unit vectors per forward when a quantized weight is read through its layer
_PROBE_BLOCK = 1024


def base_weight(module: nn.Module) -> torch.Tensor:
    """The layer's base weight as a float tensor (`d_out x d_in`).

    A quantized base (bitsandbytes 4/8-bit, or any other backend) is read as the layer computes it: its outputs on
    the unit vectors, `_PROBE_BLOCK` at a time, minus its output on zero (the bias). This needs no knowledge of the
    storage format, which bitsandbytes changes on its CPU backend after the first forward (its own dequantize then
    gives garbage).
    """
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    if _readable(base.weight):
        return full_value(base.weight)
    d_in = base.in_features
    columns = []
    for start in range(0, d_in, _PROBE_BLOCK):
        count = min(_PROBE_BLOCK, d_in - start)
        units = torch.zeros(count, d_in, device=base.weight.device)
        units[torch.arange(count), start + torch.arange(count)] = 1.0
        columns.append(_through_layer(base, units))
    return torch.cat(columns).T.contiguous()


def _readable(weight: torch.Tensor) -> bool:
    """Whether the weight is stored as a float matrix (not quantized), so it can be read directly."""
    return weight.dtype.is_floating_point and len(shape_of(weight)) == 2


def _through_layer(base: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """`rows @ W^T` (float32) as the layer computes it: its output on `rows` minus its output on zero (the bias)."""
    with torch.no_grad():
        zero = base(torch.zeros(1, rows.shape[1], device=rows.device)).float()
        return base(rows).float() - zero


#: fixed random directions whose images under the pre-trained weight identify it (see `weight_fingerprint`)
FINGERPRINT_PROBES = 2
#: relative gap between fingerprints accepted as the same weights: a cast to bfloat16 moves them by ~2e-3, another
#: model of the same shapes by ~1.4 (random weights) or more
FINGERPRINT_TOLERANCE = 2e-2


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """`W g` (`d_out x 2`, float32) for two fixed Gaussian directions `g`: cheap, stable under a dtype cast of the same
    weights, and different for any other weight of the same shape."""
    return weight.float() @ fingerprint_probes(weight.shape[1], weight.device)


def fingerprint_probes(d_in: int, device: torch.device | str) -> torch.Tensor:
    """The fixed Gaussian directions `g` (`d_in x 2`, float32) of `weight_fingerprint`, seeded by `d_in`."""
    generator = torch.Generator().manual_seed(d_in)
    return torch.randn(d_in, FINGERPRINT_PROBES, generator=generator).to(device)


def weight_response(module: nn.Module) -> torch.Tensor:
    """`W g` of the layer's base weight as it computes now (`d_out x 2`, float32): from the weight itself (gathered
    when sharded: every rank calls it), or, for a quantized weight, through the layer on `g` minus its bias."""
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    if _readable(base.weight):
        return weight_fingerprint(full_value(base.weight))
    probes = fingerprint_probes(base.in_features, base.weight.device)
    return _through_layer(base, probes.T.contiguous()).T.contiguous()


def fingerprint_gap(saved: torch.Tensor, weight: torch.Tensor) -> float:
    """Relative distance between a saved fingerprint and that of `weight`."""
    actual = weight_fingerprint(weight).to(saved.device)
    return float((actual - saved.float()).norm() / saved.float().norm().clamp_min(1e-30))


def is_quantized(module: nn.Module) -> bool:
    """Whether the layer's base weight is stored quantized (nothing can be added into it)."""
    return not module.get_base_layer().weight.dtype.is_floating_point


def merges_exactly(module: nn.Module) -> bool:
    """Whether a float32 update can be added into this layer's base weight without losing it to rounding."""
    weight = module.get_base_layer().weight
    return weight.dtype in EXACT_MERGE_DTYPES and len(shape_of(weight)) == 2


def apply_delta_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """Add a float32 update into a base weight, rounded once to its dtype. Used for training and for reloading, so both
    give the same bits. A sharded weight is changed through `update_` (FSDP2: each rank adds its own rows)."""

    def add(target: torch.Tensor, part: torch.Tensor) -> None:
        if target.dtype == part.dtype:  # the same single rounding, without a transient copy of the weight
            target.add_(part)
        else:
            target.copy_((target.to(part.dtype) + part).to(target.dtype))

    update_(weight, delta, add)
