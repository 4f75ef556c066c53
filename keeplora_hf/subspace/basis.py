"""Orthonormal subspaces stored by whichever basis is smaller: the subspace's own or that of its complement.

A protected subspace of `R^d` of dimension `k` is known exactly from an orthonormal basis of it (`d x k`) or of its
orthogonal complement (`d x (d - k)`). Everything KeepLoRA++ does with it is "remove the protected component", which
either basis computes: `x - (x Q) Q^T = (x R) R^T`. Keeping the smaller one bounds the state at `min(k, d - k) * d`
values and makes the projection cheaper too.
"""

from __future__ import annotations

import torch

#: dtype in which projections are computed, whatever dtype a basis is stored in
WORK_DTYPE = torch.float32
#: dtypes in which a stored basis is orthonormal to working precision; lower ones are re-orthonormalised
EXACT_DTYPES = (torch.float32, torch.float64)


def orthogonal_complement(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (`d x (d - k)`) of the orthogonal complement of the orthonormal columns of `basis`.

    Householder QR of `basis` gives an orthogonal `H` whose first `k` columns span `basis`; its last `d - k` columns are
    formed directly (`ormqr`), so no `d x d` matrix is ever built. Deterministic for a given input.
    """
    d, k = basis.shape
    if k == 0:
        return torch.eye(d, dtype=basis.dtype, device=basis.device)
    if k >= d:
        return basis.new_zeros(d, 0)
    reflectors, tau = torch.geqrf(basis)
    selector = basis.new_zeros(d, d - k)
    selector[k:].fill_diagonal_(1.0)
    return torch.ormqr(reflectors, tau, selector)


def orthonormalize(columns: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning `columns` (assumed of full column rank), by QR."""
    if columns.shape[1] == 0:
        return columns
    q, _ = torch.linalg.qr(columns)
    return q


class Subspace:
    """A subspace of `R^d` known by an orthonormal basis of itself or of its complement, whichever is narrower.

    `span` is the subspace's dimension. Rows are projected with `project_out` (remove the component in the subspace)
    and `project_onto` (keep only it). Low-precision storage (bfloat16, float16) is re-orthonormalised in float32
    once, when the subspace is built, so projections are exact for the subspace that was stored.
    """

    def __init__(self, stored: torch.Tensor, *, complement: bool) -> None:
        if stored.ndim != 2:
            raise ValueError(f"a basis must be a (d, k) matrix, got shape {tuple(stored.shape)}")
        if stored.dtype not in EXACT_DTYPES:
            stored = orthonormalize(stored.to(WORK_DTYPE))
        self.stored = stored
        self.complement = complement

    @classmethod
    def of(cls, basis: torch.Tensor) -> Subspace:
        """The subspace spanned by the orthonormal columns of `basis`, stored by the narrower of the two bases."""
        d, k = basis.shape
        if k > d - k:
            work = basis if basis.dtype in EXACT_DTYPES else orthonormalize(basis.to(WORK_DTYPE))
            return cls(orthogonal_complement(work), complement=True)
        return cls(basis, complement=False)

    @property
    def ambient(self) -> int:
        return self.stored.shape[0]

    @property
    def span(self) -> int:
        return self.ambient - self.stored.shape[1] if self.complement else self.stored.shape[1]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Subspace:
        return Subspace(self.stored.to(dtype=dtype or self.stored.dtype, device=device), complement=self.complement)

    def project_out(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows (I - S S^T)`: each row without its component in the subspace (in `rows`' dtype)."""
        basis = self.stored.to(device=rows.device, dtype=rows.dtype)
        if self.complement:
            return (rows @ basis) @ basis.T
        if basis.shape[1] == 0:
            return rows
        return rows - (rows @ basis) @ basis.T

    def project_out_(self, rows: torch.Tensor) -> torch.Tensor:
        """In-place `project_out` for a float tensor of the stored dtype's precision or lower (e.g. a LoRA weight)."""
        basis = self.stored.to(device=rows.device, dtype=rows.dtype)
        if self.complement:
            return rows.copy_((rows @ basis) @ basis.T)
        if basis.shape[1]:
            rows.sub_((rows @ basis) @ basis.T)
        return rows

    def project_onto(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows S S^T`: each row's component in the subspace."""
        return rows - self.project_out(rows)

    def basis(self) -> torch.Tensor:
        """An orthonormal basis of the subspace itself (`d x span`); built when stored as the complement."""
        return orthogonal_complement(self.stored) if self.complement else self.stored

    def complement_basis(self) -> torch.Tensor:
        """An orthonormal basis of the orthogonal complement (`d x (d - span)`)."""
        return self.stored if self.complement else orthogonal_complement(self.stored)
