import pytest
import torch

from keeplora_hf.subspace import energy_rank, principal_basis, principal_rank


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


@pytest.mark.parametrize(
    ("energy", "expected"),
    # energies 4, 3, 2, 1 (sum 10): cumulative fractions 0.4, 0.7, 0.9, 1.0; the reference keeps those below energy
    [(0.0, 0), (0.3, 1), (0.4, 1), (0.41, 1), (0.7, 1), (0.75, 2), (0.95, 3), (1.0, 4)],
)
def test_principal_rank_is_the_reference_count_below_the_energy(energy, expected):
    """MTIL/model/prin_subspace.py and MCITlib/.../extract_weights.py: r = sum(cumsum(ratio) < threshold), max(r, 1)."""
    assert principal_rank(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), energy) == expected


def test_principal_rank_ends_are_exact():
    assert principal_rank(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 1.0) == 1
    assert principal_rank(torch.zeros(3, dtype=torch.float64), 0.5) == 0


def _weight_with_spectrum(singular, d_out=7, d_in=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(singular), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(singular), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T, v


@pytest.mark.parametrize(
    ("energy", "p"),
    # singular values 5, 4, 3, 2, 1 -> energies 25, 16, 9, 4, 1 (sum 55): cumulative .455, .745, .909, .982, 1
    [(0.0, 0), (0.45, 1), (0.6, 1), (0.8, 2), (0.95, 3), (0.99, 4), (1.0, 5)],
)
def test_principal_basis_is_the_energy_threshold_set_of_right_singular_vectors(energy, p):
    weight, v = _weight_with_spectrum([5.0, 4.0, 3.0, 2.0, 1.0])
    basis = principal_basis(weight.float(), energy)
    assert basis.shape == (6, p)
    expected = v[:, :p]
    assert torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-5)
    assert torch.allclose(basis.T @ basis, torch.eye(p, dtype=basis.dtype), atol=1e-10)


@pytest.mark.parametrize(
    ("energy", "p"), [(0.0, 0), (0.45, 1), (0.6, 1), (0.8, 2), (0.95, 3), (0.99, 4), (1.0, 5)]
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


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_left_side_takes_the_left_singular_vectors_as_input_directions(solver):
    """principal_side='left' (the reference CLIP code: U[:, :p] of svd(W)): for a square W these are the right singular
    vectors of W^T, a different subspace from W's own right ones."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    weight = u @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ v.T
    left, energies = principal_basis(weight.float(), 0.8, solver=solver, side="left", return_energies=True)
    right = principal_basis(weight.float(), 0.8, solver=solver)
    assert left.shape == right.shape == (6, 2)
    assert torch.allclose(left @ left.T, u[:, :2] @ u[:, :2].T, atol=1e-5)
    assert torch.allclose(right @ right.T, v[:, :2] @ v[:, :2].T, atol=1e-5)
    assert (left @ left.T - right @ right.T).abs().max() > 0.1
    assert torch.allclose(energies, torch.tensor([25.0, 16.0], dtype=torch.float64), rtol=1e-5)


def test_left_side_refuses_a_non_square_weight_and_an_unknown_side():
    with pytest.raises(ValueError, match="needs a square weight; this one is 4 x 3"):
        principal_basis(torch.randn(4, 3), 0.5, side="left")
    with pytest.raises(ValueError, match="principal_side must be one of"):
        principal_basis(torch.eye(3), 0.5, side="up")
