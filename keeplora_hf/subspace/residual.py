"""Directions for LoRA's `A` inside the residual subspace, the orthogonal complement of a protected basis."""

from __future__ import annotations

import torch

from .basis import Subspace
from .principal import COMPUTE_DTYPE

#: bases are stored in float32, so anything below ~1e-6 of the top singular value is rounding, not signal
RELATIVE_TOLERANCE = 1e-6


def project_out(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`matrix (I - basis basis^T)`: removes from each row its component in `span(basis)`."""
    if basis.shape[1] == 0:
        return matrix
    basis = basis.to(matrix.dtype)
    return matrix - (matrix @ basis) @ basis.T


def as_subspace(protected: torch.Tensor | Subspace) -> Subspace:
    """A protected subspace given as an orthonormal `(d_in, k)` basis or as a `Subspace`."""
    return protected if isinstance(protected, Subspace) else Subspace(protected, complement=False)


def residual_directions(gradient: torch.Tensor, protected: torch.Tensor | Subspace, rank: int) -> torch.Tensor:
    """The top-`rank` right singular vectors of `gradient (I - P P^T)`, as the rows of `A` (`rank x d_in`).

    They are the best rank-`rank` orthonormal rows under `A P = 0`. Where the residual gradient has fewer than `rank`
    non-zero singular values, the rows are completed with other residual directions; where the residual subspace
    itself is smaller than `rank`, the missing rows are zero, so `A P = 0` always holds. This is the exact path: a
    full float64 SVD of the `d_out x d_in` residual gradient.
    """
    protected = as_subspace(protected)
    residual = protected.project_out(gradient.to(COMPUTE_DTYPE))
    singular, vh = right_singular_vectors(residual)
    return rows_in_residual(vh, singular, protected, rank)


def right_singular_vectors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right singular vectors (as rows) of `matrix`, by the SVD of whichever of `matrix` and its
    transpose is tall: LAPACK's SVD of a wide matrix is several times slower than of its transpose."""
    if matrix.shape[0] < matrix.shape[1]:
        u, singular, _ = torch.linalg.svd(matrix.T, full_matrices=False)
        return singular, u.T
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    return singular, vh


def rows_in_residual(
    vh: torch.Tensor, singular: torch.Tensor, protected: Subspace, rank: int, *, seed: int = 0
) -> torch.Tensor:
    """`rank` orthonormal rows of `A` from candidate right singular vectors `vh` (descending `singular`).

    Rows whose singular value is rounding noise are replaced by other residual directions (random, from `seed`); rows
    beyond the residual dimension are zero. The result is projected out of the protected subspace once more, so
    `A P = 0` holds to rounding whatever the candidates' accuracy.
    """
    d_in = vh.shape[1]
    residual_dim = d_in - protected.span
    tolerance = singular.max().clamp_min(torch.finfo(COMPUTE_DTYPE).tiny) * RELATIVE_TOLERANCE if singular.numel() else 0.0
    informative = min(rank, residual_dim, int((singular > tolerance).sum()))
    rows = [vh[:informative].to(COMPUTE_DTYPE)]
    missing = min(rank, residual_dim) - informative
    if missing > 0:
        rows.append(complete_rows(rows[0], protected, missing, seed=seed))
    if rank > residual_dim:
        rows.append(torch.zeros(rank - residual_dim, d_in, dtype=COMPUTE_DTYPE, device=vh.device))
    return protected.project_out(torch.cat(rows))


def complete_rows(rows: torch.Tensor, protected: Subspace, count: int, *, seed: int = 0) -> torch.Tensor:
    """`count` orthonormal rows orthogonal to `rows` (orthonormal) and to the protected subspace.

    Random Gaussian rows, projected twice (for rounding) and orthonormalised: `O(count * d)` memory, where a
    `d x d` projector would be quadratic in `d`.
    """
    d_in = rows.shape[1]
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randn(count, d_in, generator=generator, dtype=COMPUTE_DTYPE).to(rows.device)
    for _ in range(2):
        extra = protected.project_out(extra)
        extra = project_out(extra, rows.T)
    q, _ = torch.linalg.qr(extra.T)
    return q.T
