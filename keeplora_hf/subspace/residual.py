"""Directions for LoRA's `A` inside the residual subspace, the orthogonal complement of a protected basis."""

from __future__ import annotations

import torch

from .principal import COMPUTE_DTYPE


def project_out(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`matrix (I - basis basis^T)`: removes from each row its component in `span(basis)`."""
    if basis.shape[1] == 0:
        return matrix
    basis = basis.to(matrix.dtype)
    return matrix - (matrix @ basis) @ basis.T


def residual_directions(gradient: torch.Tensor, protected: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` right singular vectors of `gradient (I - P P^T)`, as the rows of `A` (`rank x d_in`).

    They are the best rank-`rank` orthonormal rows under `A P = 0`. Where the residual gradient has fewer than `rank`
    non-zero singular values, the rows are completed with other residual directions; where the residual subspace
    itself is smaller than `rank`, the missing rows are zero, so `A P = 0` always holds.
    """
    d_in = gradient.shape[1]
    protected = protected.to(COMPUTE_DTYPE)
    residual = project_out(gradient.to(COMPUTE_DTYPE), protected)
    _, singular, vh = torch.linalg.svd(residual, full_matrices=False)
    # bases are stored in float32, so anything below ~1e-6 of the top singular value is rounding, not signal
    tolerance = singular.max().clamp_min(torch.finfo(COMPUTE_DTYPE).tiny) * 1e-6
    residual_dim = d_in - protected.shape[1]
    informative = min(rank, residual_dim, int((singular > tolerance).sum()))
    rows = [vh[:informative]]
    missing = min(rank, residual_dim) - informative
    if missing > 0:
        rows.append(_complement(torch.cat([protected, vh[:informative].T], dim=1), missing))
    if rank > residual_dim:
        rows.append(torch.zeros(rank - residual_dim, d_in, dtype=COMPUTE_DTYPE, device=gradient.device))
    return project_out(torch.cat(rows), protected)


def _complement(basis: torch.Tensor, count: int) -> torch.Tensor:
    """`count` orthonormal rows orthogonal to the columns of `basis` (orthonormal, `d_in x k`)."""
    d_in = basis.shape[0]
    complement = project_out(torch.eye(d_in, dtype=basis.dtype, device=basis.device), basis)
    u, _, _ = torch.linalg.svd(complement, full_matrices=False)
    return u[:, :count].T
