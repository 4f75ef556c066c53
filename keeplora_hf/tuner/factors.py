"""KeepLoRA's `lora_A` / `lora_B` stay float32 whatever casts the model meets.

`A` must be orthogonal to the protected subspace to ~1e-7; rounded to bfloat16 it leaks ~1e-3 of every update into
it. PEFT creates the factors in float32 (`autocast_adapter_dtype`), but a later `model.to(torch.bfloat16)`, `.half()`
or the Trainer's `bf16_full_eval` would cast them with the base. The factors are therefore `Float32Factor`s: a plain
`nn.Linear` whose dtype casts keep float32 while device moves go through (LoRA's forward already casts its input to
the factor's dtype and the sum back to the base's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

FACTOR_DTYPE = torch.float32


class Float32Factor(nn.Linear):
    """An `nn.Linear` LoRA factor that follows the model's device but never leaves float32."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        return super()._apply(lambda t: _float32_after(fn, t), recurse)


def _float32_after(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    out = fn(tensor)
    if out.is_floating_point() and out.dtype != FACTOR_DTYPE:  # a dtype cast: keep the device, not the dtype
        return tensor.to(device=out.device, dtype=FACTOR_DTYPE)
    return out


def keep_float32_(factor: nn.Module) -> None:
    """Make a LoRA factor a float32 `Float32Factor` (in place; the parameters are the same objects)."""
    if type(factor) is nn.Linear:
        factor.__class__ = Float32Factor
    factor.to(FACTOR_DTYPE)
