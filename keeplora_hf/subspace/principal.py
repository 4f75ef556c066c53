"""The principal subspace of a pre-trained weight: its top right singular vectors by spectral energy."""

from __future__ import annotations

import torch

COMPUTE_DTYPE = torch.float64


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
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12).item()) + 1


def principal_basis(weight: torch.Tensor, energy: float) -> torch.Tensor:
    """Right singular vectors of `weight` (`d_out x d_in`) holding `energy` of its squared singular values.

    Returns `(d_in, p)` in float64; whatever the weight's dtype, the decomposition runs in float64.
    """
    _, singular, vh = torch.linalg.svd(weight.detach().to(COMPUTE_DTYPE), full_matrices=False)
    p = energy_rank(singular.square(), energy)
    return vh[:p].T.contiguous()
