"""The reference CLIP code's feature statistic: the running mean of the batches' input matrices, aligned row by row."""

from __future__ import annotations

import torch

from .principal import COMPUTE_DTYPE


class PositionMeanStatistics:
    """The mean `M` (`rows x d_in`) of the batches' input matrices, row `i` of every batch added to row `i` of `M`.

    A row is one token position of one batch slot, so for shuffled data `M` tends to each position's mean token as
    batches accumulate. The reference (KeepLoRA, MTIL/model/peft_modules.py, `accumulate_features`) keeps the
    transpose and decomposes it by SVD; its left singular vectors are the eigenvectors of `covariance = M^T M`, with
    the squared singular values as eigenvalues, so the GPM criterion reads it as it reads a second moment. Only
    batches of the first batch's row count are added (the reference's loader drops a short last batch); `skipped`
    counts the others. `total` (the row-wise sum) is what data-parallel ranks sum before `covariance` is read.
    """

    def __init__(self, d_in: int, device: torch.device | str = "cpu", dtype: torch.dtype = COMPUTE_DTYPE) -> None:
        self.d_in, self.device, self.dtype = d_in, torch.device(device), dtype
        self.total: torch.Tensor | None = None
        self.batches = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = 0
        self._covariance: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, self.d_in).to(device=self.device, dtype=self.dtype)
        if self.total is None:
            self.total = rows.clone()
        elif rows.shape[0] != self.total.shape[0]:
            self.skipped += 1
            return
        else:
            self.total.add_(rows)
        self.batches += 1
        self._covariance = None

    @property
    def covariance(self) -> torch.Tensor:
        """`M^T M` (`d_in x d_in`), formed once after the last update; zero before any batch."""
        if self._covariance is None:
            if self.total is None:
                self._covariance = torch.zeros(self.d_in, self.d_in, dtype=self.dtype, device=self.device)
            else:
                mean = self.total / self.batches.clamp_min(1).to(self.dtype)
                self._covariance = mean.T @ mean
        return self._covariance
