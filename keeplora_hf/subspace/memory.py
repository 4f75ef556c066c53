"""Feature memory of finished tasks, grown by the GPM energy criterion (Saha et al., 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .basis import Subspace, orthogonal_complement, orthonormalize
from .principal import COMPUTE_DTYPE, energy_rank

MEMORY_SOLVERS = ("randomized", "eigh")


#: from this width on, only the upper block triangle of each batch's `x^T x` is formed (symmetry saves ~40%)
BLOCKED_FROM = 1024
_BLOCKS = 4


class FeatureStatistics:
    """Streaming second moment `sum x^T x` of a layer's input rows: all that the GPM criterion needs of them.

    Holding `d_in x d_in` instead of the features keeps memory fixed however much data a task has. Each batch's
    product is formed in `dtype` and added to the running sum; float32 halves the time and memory of float64 and
    keeps the relative error near 1e-6, far below what the 0.99-energy criterion resolves. From `d_in = 1024` on, each
    batch forms only the blocks on and above the diagonal (4 x 4 blocks: 10 of 16 products), and `covariance`
    mirrors them once, when it is first read after an update.
    """

    def __init__(self, d_in: int, device: torch.device | str = "cpu", dtype: torch.dtype = COMPUTE_DTYPE) -> None:
        self._sum = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self._mirrored = True
        self.count = 0
        bounds = torch.linspace(0, d_in, _BLOCKS + 1).round().long().tolist() if d_in >= BLOCKED_FROM else [0, d_in]
        self._blocks = list(zip(bounds[:-1], bounds[1:]))

    @property
    def covariance(self) -> torch.Tensor:
        if not self._mirrored:
            for i, (a0, a1) in enumerate(self._blocks):
                for b0, b1 in self._blocks[i + 1 :]:
                    self._sum[b0:b1, a0:a1] = self._sum[a0:a1, b0:b1].T
            self._mirrored = True
        return self._sum

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(self._sum.dtype)
        if len(self._blocks) == 1:
            self._sum.addmm_(rows.T, rows)
        else:
            for i, (a0, a1) in enumerate(self._blocks):
                left = rows[:, a0:a1].T
                self._sum[a0:a1, a0:].addmm_(left, rows[:, a0:])
            self._mirrored = False
        self.count += rows.shape[0]

    def update_covariance(self, covariance: torch.Tensor, count: int = 1) -> None:
        self.covariance.add_(covariance.to(self._sum.dtype))
        self.count += count

    @staticmethod
    def multiply_adds_per_row(d_in: int) -> int:
        return d_in * d_in if d_in < BLOCKED_FROM else d_in * d_in * 10 // 16


class ResidualCovariance(NamedTuple):
    """A feature statistic known only where it is needed: `R^T C R` in the coordinates of the complement basis `R` that
    a protected subspace is stored by, and `trace(C)`; all the GPM criterion uses of `C` there (`grow_memory`)."""

    matrix: torch.Tensor
    total: torch.Tensor


class ResidualStatistics:
    """Streaming `R^T (sum x^T x) R` and `sum |x|^2` of a layer's input rows, for a protected subspace stored by its
    complement `R` (`d_in x room`, `room < d_in / 2`): each batch costs `n (d_in room + room^2)` multiply-adds instead of
    the `n d_in^2` of the whole second moment, and the memory solve skips forming `R^T C R` from it (`O(d_in^2 room)`)."""

    def __init__(self, coords: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> None:
        self.coords = coords.to(dtype)
        self._sum = coords.new_zeros(coords.shape[1], coords.shape[1], dtype=dtype)
        self._total = coords.new_zeros((), dtype=dtype)
        self.count = 0

    @property
    def covariance(self) -> ResidualCovariance:
        return ResidualCovariance(self._sum, self._total)

    @staticmethod
    def multiply_adds_per_row(d_in: int, room: int) -> int:
        return d_in * room + room * room

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(self._sum.dtype)
        projected = rows @ self.coords
        self._sum.addmm_(projected.T, projected)
        flat = rows.reshape(-1)
        self._total += flat @ flat
        self.count += rows.shape[0]


def extend_memory(
    memory: torch.Tensor, principal: torch.Tensor, covariance: torch.Tensor, energy: float
) -> torch.Tensor:
    """Return `memory` extended with the task's dominant feature directions outside `[principal, memory]`.

    Directions are added, strongest first, until `[principal, memory]` explains `energy` of the task's feature energy
    `trace(C)`. The result stays orthonormal, orthogonal to `principal`, and never exceeds `d_in - p` columns. This is
    the exact computation (float64 `eigh`); `memory_directions` is the same with a choice of solver.
    """
    protected = torch.cat([principal.to(COMPUTE_DTYPE), memory.to(COMPUTE_DTYPE)], dim=1)
    new = memory_directions(covariance.to(COMPUTE_DTYPE), Subspace(protected, complement=False), energy, solver="eigh")
    return torch.cat([memory.to(COMPUTE_DTYPE), new.to(COMPUTE_DTYPE)], dim=1)


class MemoryGrowth(NamedTuple):
    """New memory directions (`d_in x m`) and, where the solve yields it for free, an orthonormal basis of what stays
    unprotected after them (`remaining`, `d_in x (room - m)`): the eigenvectors of the residual covariance in the
    coordinates of a residual basis split that basis into the two, so a state stored by its complement takes
    `remaining` as its new complement instead of deriving it from the directions (a float64 QR and product)."""

    directions: torch.Tensor
    remaining: torch.Tensor | None = None


def memory_directions(
    covariance: torch.Tensor | ResidualCovariance, protected: Subspace, energy: float, *, solver: str = "eigh", seed: int = 0
) -> torch.Tensor:
    """New orthonormal memory directions (`d_in x m`, orthogonal to `protected`) by the GPM criterion (`grow_memory`)."""
    return grow_memory(covariance, protected, energy, solver=solver, seed=seed).directions


def grow_memory(
    covariance: torch.Tensor | ResidualCovariance, protected: Subspace, energy: float, *, solver: str = "eigh", seed: int = 0
) -> MemoryGrowth:
    """New orthonormal memory directions (`d_in x m`, orthogonal to `protected`) by the GPM criterion, with what stays
    unprotected where the solve gives it (`MemoryGrowth`).

    With `C` the task's feature covariance and `C'` its restriction to the residual subspace (the complement of
    `protected`), directions of `C'` are taken strongest first until `protected` plus them explains `energy` of
    `trace(C)`. Solvers:

    - `"eigh"`: the full eigendecomposition of `C'` in the covariance's dtype (the reference);
    - `"randomized"`: Ritz pairs of `C'` on a random subspace (three power iterations) of `d_in / 32 + 10` columns,
      grown fourfold while it captures at least 90% of the energy needed; otherwise (a flat spectrum, where many
      directions are needed) the full `eigh`, which is then the cheaper computation. The energy each chosen
      direction explains is its Rayleigh quotient `v^T C v`, computed exactly, so the criterion is guaranteed for the
      directions actually added; the only cost of the approximation is possibly a few more directions than the
      exact eigenvectors would need (bounded in tests/subspace/test_memory.py). Run in the covariance's dtype
      (float32 in the lifecycle).

    Where the protected subspace is stored by its own basis `Q` (`k < d_in / 2`), the randomized solver applies
    `C' = (I - Q Q^T) C (I - Q Q^T)` to its blocks without forming it, and `trace(C') = trace(C) - trace(Q^T C Q)`:
    `O(d_in^2 k)` instead of the `O(d_in^3)` of a complement basis and `R^T C R`. Otherwise (and for `eigh`) the
    residual covariance is formed in the coordinates of an orthonormal basis `R` of the residual subspace, an
    eigenproblem of size `d_in - k`. Where `protected` is stored by that complement `R` itself, the new directions
    `R V` (`V` orthonormal coordinates: eigenvectors or Ritz vectors) are returned as the solver leaves them,
    orthonormal and orthogonal to `protected` to its precision, with `remaining = R V_rest` (`V_rest` the rest of the
    eigenvectors, or the complement of the Ritz vectors): a state stored that way keeps only `remaining`. Otherwise the
    directions are projected and re-orthonormalised once more, as they are appended to a stored basis, and
    `remaining` is given where it is narrower than the protected subspace grown by them (a state then switches to it).
    `covariance` may be that `R^T C R` already (`ResidualCovariance`, from `ResidualStatistics` over the same `R`).
    """
    if solver not in MEMORY_SOLVERS:
        raise ValueError(f"solver must be one of {MEMORY_SOLVERS}, got {solver!r}")
    known = isinstance(covariance, ResidualCovariance)
    matrix = covariance.matrix if known else covariance
    dtype, d_in = matrix.dtype, protected.ambient
    empty = matrix.new_zeros(d_in, 0)
    room = d_in - protected.span
    total = covariance.total if known else torch.trace(covariance)
    if known and not (protected.complement and matrix.shape == (room, room)):
        raise ValueError(
            f"a residual covariance of shape {tuple(matrix.shape)} needs the protected subspace stored by its "
            f"{room}-column complement, the coordinates it was gathered in"
        )
    if total <= 0 or room <= 0 or energy <= 0:
        return MemoryGrowth(empty)
    if solver == "randomized" and not protected.complement:  # (never `known`: that needs the complement stored)
        basis = protected.stored.to(dtype=dtype, device=covariance.device)
        needed = _energy_needed(total, total - torch.trace(basis.T @ covariance @ basis), energy)
        if needed is None:
            return MemoryGrowth(empty)

        def residual(block: torch.Tensor) -> torch.Tensor:  # columns without their component in the protected subspace
            return protected.project_out(block.T).T

        vectors = _ritz_until(
            lambda block: residual(covariance @ residual(block)), room, float(needed), seed, ambient=d_in, like=covariance
        )
        if vectors is not None:
            return MemoryGrowth(orthonormalize(residual(vectors)))
        solver = "eigh"  # a flat spectrum: the full eigendecomposition below, without a second randomized attempt
    # C' = R^T C R in the coordinates of an orthonormal basis R of the residual: an eigenproblem of size d_in - k
    coords = protected.complement_basis().to(dtype=dtype, device=matrix.device)
    residual_cov = matrix if known else coords.T @ covariance @ coords
    residual_cov = (residual_cov + residual_cov.T) / 2
    needed = _energy_needed(total, torch.trace(residual_cov), energy)
    if needed is None:
        return MemoryGrowth(empty)
    vectors = None
    if solver == "randomized":
        vectors = _ritz_until(residual_cov.__matmul__, room, float(needed), seed, ambient=room, like=residual_cov)
    if vectors is None:
        values, vectors = torch.linalg.eigh(residual_cov)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        count = energy_rank(values, float(min(needed / values.sum().clamp_min(torch.finfo(dtype).tiny), 1.0)))
        vectors, rest = vectors[:, :count], vectors[:, count:]
    else:  # Ritz vectors (only where `protected` is stored by its complement): orthonormal coordinates too
        rest = orthogonal_complement(vectors)
    if protected.complement:
        return MemoryGrowth(coords @ vectors, coords @ rest)
    # a stored basis (only eigh gets here): the directions are appended to it, unless what stays unprotected is now the
    # narrower basis, which a state then stores instead (`add_memory`)
    remaining = coords @ rest if 2 * rest.shape[1] < d_in else None
    return MemoryGrowth(_cleaned(coords @ vectors, protected), remaining)


def _cleaned(directions: torch.Tensor, protected: Subspace) -> torch.Tensor:
    """`directions` projected off `protected` and re-orthonormalised: exact for appending to a stored basis."""
    return orthonormalize(protected.project_out(directions.T).T)


def _energy_needed(total: torch.Tensor, available: torch.Tensor, energy: float) -> torch.Tensor | None:
    """The feature energy new directions must explain so that the protected subspace plus them explains `energy` of
    `total`, given the energy `available` outside the protected subspace; None when nothing is needed or left."""
    available = available.clamp_min(0)
    needed = energy * total - (total - available)
    return None if needed <= 0 or available <= 0 else needed


def _ritz_until(
    apply: Callable[[torch.Tensor], torch.Tensor],
    room: int,
    needed: float,
    seed: int,
    *,
    ambient: int,
    like: torch.Tensor,
    oversampling: int = 10,
    iterations: int = 3,
) -> torch.Tensor | None:
    """Fewest Ritz vectors of the symmetric PSD operator `apply` (on `ambient`-dim columns, of rank at most `room`)
    whose Rayleigh quotients sum to `needed`; None to use eigh. The random blocks take `like`'s dtype and device."""
    generator = torch.Generator().manual_seed(seed)
    wanted = max(16, room // 32)
    while True:
        columns = min(room, wanted + oversampling)
        if 2 * columns > room:
            return None
        block = torch.randn(ambient, columns, generator=generator, dtype=like.dtype).to(like.device)
        for _ in range(iterations):
            block = orthonormalize(apply(block))
        values, rotation = torch.linalg.eigh(block.T @ apply(block))
        values, rotation = values.flip(0).clamp_min(0), rotation.flip(1)
        cumulative = torch.cumsum(values, 0)
        if cumulative[-1] >= needed:
            count = int(torch.searchsorted(cumulative, cumulative.new_tensor(needed)).item()) + 1
            return block @ rotation[:, : min(count, columns)]
        if cumulative[-1] < 0.9 * needed:  # far from enough: the spectrum is flat, a full eigh is cheaper than growing
            return None
        wanted *= 4
