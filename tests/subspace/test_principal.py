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


@pytest.mark.parametrize(
    ("energy", "p"), [(0.0, 0), (0.45, 1), (0.6, 2), (0.9, 3), (0.95, 4), (1.0, 5)]
)
@pytest.mark.parametrize("transpose", [False, True], ids=["tall", "wide"])
def test_gram_solver_gives_the_same_energy_set(energy, p, transpose):
    weight, v = _weight_with_spectrum([5.0, 4.0, 3.0, 2.0, 1.0], d_out=6, d_in=7) if transpose else _weight_with_spectrum(
        [5.0, 4.0, 3.0, 2.0, 1.0]
    )
    basis = principal_basis(weight.float(), energy, solver="gram")
    reference = principal_basis(weight.float(), energy, solver="svd")
    assert basis.shape == reference.shape == (weight.shape[1], p)
    assert torch.allclose(basis @ basis.T, reference @ reference.T, atol=1e-6)
    assert torch.allclose(basis.T @ basis, torch.eye(p, dtype=basis.dtype), atol=1e-6)


@pytest.mark.parametrize("shape", [(520, 520), (700, 520), (520, 700)])
def test_float32_gram_solver_is_within_1e_5_of_the_float64_svd(shape):
    """Above 512 rows the Gram is decomposed in float32: same p, the same captured energy, the same subspace."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    fast = principal_basis(weight, 0.6, solver="gram")
    exact = principal_basis(weight, 0.6, solver="svd")
    assert fast.shape == exact.shape
    energy = lambda basis: (weight.double() @ basis).square().sum()  # noqa: E731
    assert abs(energy(fast) - energy(exact)) / energy(exact) < 1e-6
    assert (fast @ fast.T - exact @ exact.T).abs().max() < 1e-5


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver must be one of"):
        principal_basis(torch.eye(3), 0.5, solver="qr")
