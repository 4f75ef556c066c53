"""The principal subspace of a pre-trained weight: its top singular vectors by spectral energy, as input directions."""

from __future__ import annotations

import torch

from .basis import orthonormalize

COMPUTE_DTYPE = torch.float64
PRINCIPAL_SOLVERS = ("gram", "svd")
#: which singular vectors of `W` (`d_out x d_in`) are protected as input directions: "right" (those of `W`'s input
#: space; the reference LLaVA code) or "left" (those of its output space, meaningful only when `d_out == d_in`; the
#: reference CLIP code)
PRINCIPAL_SIDES = ("right", "left")
#: below this many rows in the Gram matrix, "gram" works in float64 (it costs nothing there)
GRAM_FLOAT64_BELOW = 512


def energy_rank(values: torch.Tensor, energy: float) -> int:
    """Smallest count `p` such that the first `p` of `values` (energies, descending) hold `energy` of their sum.

    `energy == 0` gives 0 and `energy == 1` gives the number of non-zero values, so both ends are exact.
    """
    if energy <= 0:
        return 0
    total = values.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(values, 0) / total
    # a tiny tolerance keeps energy == 1.0 from asking for directions that carry only rounding noise
    return int(torch.searchsorted(cumulative, cumulative.new_tensor(energy - 1e-12)).item()) + 1


def principal_rank(values: torch.Tensor, energy: float) -> int:
    """How many principal directions the reference code keeps: those whose cumulative share of `values` (energies,
    descending) stays below `energy`, at least one.

    That is GPM's first-task count, which the reference applies to the pre-trained weights of CLIP and LLaVA alike: one
    direction fewer than `energy_rank` (the smallest count reaching `energy`) unless a share lands exactly on `energy`.
    The ends are exact: `energy == 0` keeps nothing and `energy == 1` every direction with energy (the reference's
    count would drop the last one there, or not, by rounding).
    """
    if energy <= 0 or energy >= 1:
        return energy_rank(values, energy)
    total = values.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(values, 0) / total
    return max(1, int((cumulative < energy).sum().item()))


def principal_source(weight: torch.Tensor, side: str) -> torch.Tensor:
    """The matrix whose right singular vectors are the principal directions on `side`: `W`, or `W^T` for "left"."""
    if side not in PRINCIPAL_SIDES:
        raise ValueError(f"principal_side must be one of {PRINCIPAL_SIDES}, got {side!r}")
    if side == "right":
        return weight
    if weight.shape[0] != weight.shape[1]:
        raise ValueError(
            f"principal_side='left' protects left singular vectors of W (d_out x d_in) as input directions, which "
            f"needs a square weight; this one is {weight.shape[0]} x {weight.shape[1]}"
        )
    return weight.T


def principal_basis(
    weight: torch.Tensor,
    energy: float,
    *,
    solver: str = "svd",
    side: str = "right",
    return_energies: bool = False,
    rank: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The top singular vectors of `weight` (`d_out x d_in`) on `side` (right by default; see `PRINCIPAL_SIDES`),
    `principal_rank(energy)` of them.

    Returns `(d_in, p)` in float64 (the columns are orthonormal). Solvers:

    - `"svd"`: a full float64 SVD of the weight; the reference.
    - `"gram"`: the eigendecomposition of the smaller Gram matrix (`W^T W` or `W W^T`), in float32 once it has more
      than 512 rows. The Gram squares the condition number, which only matters for directions far below the ones kept
      (those hold `energy` of the spectrum); the subspace agrees with `"svd"` to about 1e-5 and `p` is the same (see
      tests/subspace/test_principal.py and benchmarks/principal.py for the measured agreement and speed-up).

    With `return_energies`, also the `p` squared singular values of the kept directions (float64, descending). With
    `rank`, exactly that many directions are kept instead of the energy criterion (to recompute a known basis).
    """
    if solver not in PRINCIPAL_SOLVERS:
        raise ValueError(f"solver must be one of {PRINCIPAL_SOLVERS}, got {solver!r}")
    weight = principal_source(weight, side)
    if rank is not None:
        energy = 1.0
    if energy <= 0 or rank == 0:  # nothing is protected: no decomposition needed
        basis = torch.zeros(weight.shape[1], 0, dtype=COMPUTE_DTYPE, device=weight.device)
        energies = torch.zeros(0, dtype=COMPUTE_DTYPE)
    elif solver == "svd":
        _, singular, vh = torch.linalg.svd(weight.detach().to(COMPUTE_DTYPE), full_matrices=False)
        p = principal_rank(singular.square(), energy) if rank is None else min(rank, len(singular))
        basis, energies = vh[:p].T.contiguous(), singular[:p].square().cpu()
    else:
        basis, energies = _principal_from_gram(weight.detach(), energy, rank)
    return (basis, energies) if return_energies else basis


def _principal_from_gram(weight: torch.Tensor, energy: float, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in = weight.shape
    side = min(d_out, d_in)
    dtype = COMPUTE_DTYPE if side < GRAM_FLOAT64_BELOW else torch.float32
    w = weight.to(dtype)
    gram, right = _smaller_gram(w)
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    # eigenvalues at the rounding level of the Gram are zero singular values, not directions with energy
    floor = values[0].clamp_min(0) * side * torch.finfo(dtype).eps
    values = torch.where(values > floor, values, torch.zeros_like(values))
    p = principal_rank(values.to(COMPUTE_DTYPE), energy) if rank is None else min(rank, side)
    if right:
        basis = vectors[:, :p]
    else:  # v_i = W^T u_i / sigma_i; the columns of W^T U_p are orthogonal, QR only normalises them
        basis, _ = torch.linalg.qr(w.T @ vectors[:, :p])
    return basis.to(COMPUTE_DTYPE).contiguous(), values[:p].to(COMPUTE_DTYPE).cpu()


def squared_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Every squared singular value of `weight` (float64, descending): the eigenvalues of its smaller Gram matrix.

    In float64 the Gram's rounding is about 1e-16 of the largest value, far below anything that tells two weights
    apart, and it is several times faster than `torch.linalg.svdvals` (2-8x on 2048-row matrices, one thread).
    """
    gram, _ = _smaller_gram(weight.detach().to(COMPUTE_DTYPE))
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def _smaller_gram(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`W^T W` when `d_in <= d_out` (its eigenvectors are right singular vectors: True), else `W W^T` (False)."""
    right = w.shape[1] <= w.shape[0]
    return (w.T @ w if right else w @ w.T), right


def ritz_energies(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The energies of `weight` (`d_out x d_in`) inside the span of `basis` (`d_in x p`): float64, descending, on CPU.

    When `basis` spans the weight's top `p` right singular vectors these are its top `p` squared singular values,
    what `principal_basis(..., return_energies=True)` gives, to second order in the basis's rounding (a basis stored
    in bfloat16 gives them to ~1e-6, where the column norms `|W v|^2` would be off by ~1e-3).
    """
    q = orthonormalize(basis.to(weight.device, COMPUTE_DTYPE))
    projected = weight.detach().to(COMPUTE_DTYPE) @ q
    return torch.linalg.eigvalsh(projected.T @ projected).flip(0).clamp_min(0).cpu()
