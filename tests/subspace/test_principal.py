import pytest
import torch

from keeplora_hf.subspace import energy_rank, principal_basis


@pytest.mark.parametrize(
    ("energy", "expected"),
    [
        # energies 4, 3, 2, 1 (sum 10): cumulative fractions 0.4, 0.7, 0.9, 1.0
        (0.0, 0),
        (0.4, 1),
        (0.41, 2),
        (0.7, 2),
        (0.75, 3),
        (1.0, 4),
    ],
)
def test_energy_rank_hand_computed(energy, expected):
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), energy) == expected


def test_energy_rank_ignores_trailing_zero_energy():
    assert energy_rank(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 1.0) == 1
    assert energy_rank(torch.zeros(3, dtype=torch.float64), 0.5) == 0


def _weight_with_spectrum(singular, d_out=7, d_in=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(singular), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(singular), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T, v


@pytest.mark.parametrize(
    ("energy", "p"),
    # singular values 5, 4, 3, 2, 1 -> energies 25, 16, 9, 4, 1 (sum 55): cumulative 25/55=.455, 41/55=.745, 50/55=.909
    [(0.0, 0), (0.45, 1), (0.6, 2), (0.9, 3), (0.95, 4), (1.0, 5)],
)
def test_principal_basis_is_the_energy_threshold_set_of_right_singular_vectors(energy, p):
    weight, v = _weight_with_spectrum([5.0, 4.0, 3.0, 2.0, 1.0])
    basis = principal_basis(weight.float(), energy)
    assert basis.shape == (6, p)
    expected = v[:, :p]
    assert torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-5)
    assert torch.allclose(basis.T @ basis, torch.eye(p, dtype=basis.dtype), atol=1e-10)
