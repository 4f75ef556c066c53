"""A finished task's update of one layer, as the layer state keeps it (float32, whatever the base's dtype), and the
frozen branch through which the unmerged ones act on the layer's output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .autocast import autocast_dtype, full_precision

#: dtype of finished tasks' A and B, and of the frozen branch that applies them
TASK_DTYPE = torch.float32


@dataclass
class FinishedTask:
    """One learned task's rank-r update of a layer: `delta_W = scaling * lora_B @ lora_A` (float32)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @full_precision
    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


def merged_delta(tasks: list[FinishedTask]) -> torch.Tensor:
    """The sum of the tasks' updates, in float32."""
    total = tasks[0].delta()
    for task in tasks[1:]:
        total = total + task.delta()
    return total


class FrozenBranch:
    """`sum_t s_t B_t A_t x` of a layer's unmerged tasks, their factors stacked: one `A` (`R x d_in`), one `B`, so any
    number of tasks costs one pair of products. One layer scale for all tasks is applied after `B`, as LoRA applies
    it, so a task's function survives `end_task` bit for bit; otherwise each task's scale is folded into its columns of
    `B`.

    Outside autocast the products run in float32 (exact). Under a 16-bit autocast (`Trainer(bf16=True)`, accelerate's
    `mixed_precision`) they run in that dtype, as the base layer's do, but with `A` split into two 16-bit halves
    `A_hi + A_lo` whose products are summed in float32: rounding `A` itself to 16 bits would tilt the finished updates
    into the protected subspace (1.2e-3 of their norm, `benchmarks/branch_step_time.py`), the halves keep that under
    2e-6. `B`'s rounding scales the update but cannot tilt it. `applied_update` is the update each way applies.
    """

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: list[int], scalings: list[float]) -> None:
        if len(set(scalings)) == 1:
            self.lora_A, self.lora_B, self.scaling = lora_A, lora_B, scalings[0]
        else:
            columns = torch.cat([lora_B.new_full((r,), s) for r, s in zip(ranks, scalings)])
            self.lora_A, self.lora_B, self.scaling = lora_A, lora_B * columns, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x.device.type)
        if dtype is None:
            out = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        else:
            with torch.autocast(x.device.type, enabled=False):
                out = _SplitProducts.apply(x, self.lora_A, self.lora_B, dtype)
        return out if self.scaling is None else out.mul_(self.scaling)  # in place: not saved for backward

    def applied_update(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The update `Delta W` the branch applies (float64), outside autocast (`dtype=None`) or under a `dtype`
        autocast: what its leak into the protected subspace is measured on."""
        if dtype is None:
            a, b = self.lora_A.double(), self.lora_B.double()
        else:
            halves, lora_B = split_factors(self.lora_A, self.lora_B, dtype)
            rank = self.lora_A.shape[0]
            a, b = halves[:rank].double() + halves[rank:].double(), lora_B.double()
        delta = b @ a
        return delta if self.scaling is None else delta * self.scaling


def split_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`[A_hi; A_lo]` (`2R x d_in`, `A_hi + A_lo = A` to `dtype`'s precision squared) and `B`, in `dtype`."""
    high = lora_A.to(dtype)
    return torch.cat([high, (lora_A - high.to(lora_A.dtype)).to(dtype)]), lora_B.to(dtype)


class _SplitProducts(torch.autograd.Function):
    """The split branch's two products (float32 out). The 16-bit factors are made in the forward and again in the
    backward, never saved: kept for every layer until the backward they would add three quarters of the finished
    tasks' float32 size to the training peak (1.9 GB for LLaVA-1.5-7B after eight tasks); making them is elementwise
    work."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        halves, lora_B16 = split_factors(lora_A, lora_B, dtype)
        rank = lora_A.shape[0]
        both = F.linear(x.to(dtype), halves)
        inner = both[..., :rank].to(lora_A.dtype) + both[..., rank:]
        ctx.save_for_backward(lora_A, lora_B)  # the state's own tensors: nothing new is kept
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(inner.to(dtype), lora_B16).to(lora_A.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        lora_A, lora_B = ctx.saved_tensors
        halves, lora_B16 = split_factors(lora_A, lora_B, ctx.dtype)
        inner = grad.to(ctx.dtype) @ lora_B16  # the same gradient flows into both halves' products
        return F.linear(torch.cat([inner, inner], dim=-1), halves.T).to(ctx.x_dtype), None, None, None
