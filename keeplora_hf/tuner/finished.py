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
    """`output + sum_t s_t B_t A_t x`: a layer's unmerged tasks added to its base output, their factors stacked (one
    `A`, `R x d_in`; one `B`), so any number of tasks costs one pair of products. One layer scale for all tasks is
    applied after `B`, as LoRA applies it, so a task's function survives `end_task` bit for bit; otherwise each task's
    scale is folded into its columns of `B`.

    Outside autocast the products run in float32 and the sum is float32 (exact; the target rounds it once). Under a
    16-bit autocast (`Trainer(bf16=True)`, accelerate's `mixed_precision`) they run in that dtype, as the base layer's
    and LoRA's do, with `A` split into two 16-bit halves `A_hi + A_lo` whose products are summed in float32: rounding
    `A` itself to 16 bits would tilt the finished updates into the protected subspace (1.2e-3 of their norm,
    `benchmarks/branch_step_time.py`), the halves keep that under 2e-6. `B`'s product is accumulated into the base
    output in the output's dtype (one fused `addmm`, no float32 copy of the output); `B`'s rounding scales the update
    but cannot tilt it. `applied_update` is the update each way applies.
    """

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: list[int], scalings: list[float]) -> None:
        if len(set(scalings)) == 1:
            self.lora_A, self.lora_B, self.scaling = lora_A, lora_B, scalings[0]
        else:
            columns = torch.cat([lora_B.new_full((r,), s) for r, s in zip(ranks, scalings)])
            self.lora_A, self.lora_B, self.scaling = lora_A, lora_B * columns, 1.0

    def __call__(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output + branch(x)`: float32 outside autocast, `output`'s dtype under a 16-bit autocast."""
        dtype = autocast_dtype(x.device.type)
        if dtype is None:
            out = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
            return (out if self.scaling == 1.0 else out.mul_(self.scaling)).add_(output)  # in place: not saved
        with torch.autocast(x.device.type, enabled=False):
            return _SplitBranch.apply(x, output, self.lora_A, self.lora_B, dtype, self.scaling)

    def applied_update(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The update `Delta W` the branch applies (float64), outside autocast (`dtype=None`) or under a `dtype`
        autocast: what its leak into the protected subspace is measured on."""
        if dtype is None:
            a, b = self.lora_A.double(), self.lora_B.double()
        else:
            halves, lora_B = split_factors(self.lora_A, self.lora_B, dtype)
            rank = self.lora_A.shape[0]
            a, b = halves[:rank].double() + halves[rank:].double(), lora_B.double()
        return self.scaling * (b @ a)


def split_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`[A_hi; A_lo]` (`2R x d_in`, `A_hi + A_lo = A` to `dtype`'s precision squared) and `B`, in `dtype`."""
    high = lora_A.to(dtype)
    return torch.cat([high, (lora_A - high.to(lora_A.dtype)).to(dtype)]), lora_B.to(dtype)


class _SplitBranch(torch.autograd.Function):
    """`output + scaling * B (A_hi + A_lo) x` under a 16-bit autocast, in `output`'s dtype. The 16-bit factors are made
    in the forward and again in the backward, never saved: kept for every layer until the backward they would add three
    quarters of the finished tasks' float32 size to the training peak (1.9 GB for LLaVA-1.5-7B after eight tasks);
    making them is elementwise work. The backward takes `A_hi` alone: a gradient under autocast is a 16-bit
    computation throughout (the base layer's and LoRA's backward round their weights to 16 bits too), and the guarantee
    is about the update the forward applies, which the split keeps."""

    @staticmethod
    def forward(ctx, x, output, lora_A, lora_B, dtype, scaling):  # noqa: ANN001, ANN205
        halves, lora_B16 = split_factors(lora_A, lora_B, dtype)
        rank = lora_A.shape[0]
        both = F.linear(x.to(dtype), halves)
        inner = (both[..., :rank].to(lora_A.dtype) + both[..., rank:]).to(output.dtype)
        ctx.save_for_backward(lora_A, lora_B)  # the state's own tensors: nothing new is kept
        ctx.dtype, ctx.scaling, ctx.x_dtype = dtype, scaling, x.dtype
        flat = output.reshape(-1, output.shape[-1])
        second = lora_B16 if output.dtype == dtype else lora_B.to(output.dtype)
        summed = torch.addmm(flat, inner.reshape(-1, rank), second.T, alpha=scaling)
        return summed.view(output.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        lora_A, lora_B = ctx.saved_tensors
        inner = grad.to(ctx.dtype) @ lora_B.to(ctx.dtype)
        if ctx.scaling != 1.0:
            inner = inner.mul_(ctx.scaling)
        return F.linear(inner, lora_A.to(ctx.dtype).T).to(ctx.x_dtype), grad, None, None, None, None
