"""Feature memory of finished tasks, grown by the GPM energy criterion (Saha et al., 2021)."""

from __future__ import annotations

import torch

from .principal import COMPUTE_DTYPE, energy_rank
from .residual import project_out


class FeatureStatistics:
    """Streaming second moment `sum x^T x` of a layer's input rows: all that the GPM criterion needs of them.

    Holding `d_in x d_in` instead of the features keeps memory fixed however much data a task has.
    """

    def __init__(self, d_in: int, device: torch.device | str = "cpu") -> None:
        self.covariance = torch.zeros(d_in, d_in, dtype=COMPUTE_DTYPE, device=device)
        self.count = 0

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(COMPUTE_DTYPE)
        self.covariance.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def update_covariance(self, covariance: torch.Tensor, count: int = 1) -> None:
        self.covariance.add_(covariance.to(COMPUTE_DTYPE))
        self.count += count


def extend_memory(
    memory: torch.Tensor, principal: torch.Tensor, covariance: torch.Tensor, energy: float
) -> torch.Tensor:
    """Return `memory` extended with the task's dominant feature directions outside `[principal, memory]`.

    Directions are added, strongest first, until `[principal, memory]` explains `energy` of the task's feature energy
    `trace(C)`. The result stays orthonormal, orthogonal to `principal`, and never exceeds `d_in - p` columns.
    """
    covariance = covariance.to(COMPUTE_DTYPE)
    d_in = covariance.shape[0]
    protected = torch.cat([principal.to(COMPUTE_DTYPE), memory.to(COMPUTE_DTYPE)], dim=1)
    total = torch.trace(covariance)
    room = d_in - protected.shape[1]
    if total <= 0 or room <= 0 or energy <= 0:
        return memory.to(COMPUTE_DTYPE)
    explained = torch.trace(protected.T @ covariance @ protected)
    # eigenvectors of the covariance seen through the complement of what is already protected
    residual_cov = project_out(project_out(covariance, protected).T, protected)
    eigenvalues, eigenvectors = torch.linalg.eigh((residual_cov + residual_cov.T) / 2)
    eigenvalues = eigenvalues.flip(0).clamp_min(0)[:room]
    eigenvectors = eigenvectors.flip(1)[:, :room]
    needed = energy * total - explained
    if needed <= 0:
        return memory.to(COMPUTE_DTYPE)
    available = eigenvalues.sum()
    if available <= 0:
        return memory.to(COMPUTE_DTYPE)
    count = energy_rank(eigenvalues, float(min(needed / available, 1.0)))
    new = project_out(eigenvectors[:, :count].T, protected).T
    new, _ = torch.linalg.qr(new)
    return torch.cat([memory.to(COMPUTE_DTYPE), new], dim=1)
