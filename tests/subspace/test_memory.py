import pytest
import torch

from keeplora_hf.subspace import (
    FeatureStatistics,
    ResidualCovariance,
    ResidualStatistics,
    Subspace,
    extend_memory,
    grow_memory,
    memory_directions,
    orthogonal_complement,
)

D = 6


def _empty() -> torch.Tensor:
    return torch.zeros(D, 0, dtype=torch.float64)


def _e(*indices: int) -> torch.Tensor:
    return torch.eye(D, dtype=torch.float64)[:, list(indices)]


def _span_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a @ a.T, b @ b.T, atol=1e-9)


def test_gpm_criterion_hand_computed():
    covariance = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))  # total energy 16
    # 0.6 * 16 = 9.6 <= 10: the first direction suffices
    assert _span_equal(extend_memory(_empty(), _empty(), covariance, 0.6), _e(0))
    # 0.9 * 16 = 14.4 <= 10 + 5
    assert _span_equal(extend_memory(_empty(), _empty(), covariance, 0.9), _e(0, 1))
    # 0.99 * 16 = 15.84 > 15: all three directions with energy
    assert _span_equal(extend_memory(_empty(), _empty(), covariance, 0.99), _e(0, 1, 2))


def test_energy_already_explained_by_the_principal_basis_adds_nothing():
    covariance = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    memory = extend_memory(_empty(), _e(0), covariance, 0.6)  # principal e0 explains 10 >= 9.6
    assert memory.shape == (D, 0)
    # 0.9 needs 14.4: principal explains 10, so only e1 (5) is added, never e0 again
    memory = extend_memory(_empty(), _e(0), covariance, 0.9)
    assert _span_equal(memory, _e(1))


def test_memory_grows_orthonormal_and_is_capped_at_d_in():
    g = torch.Generator().manual_seed(0)
    principal = _e(0)
    memory = _empty()
    for _ in range(6):
        x = torch.randn(50, D, generator=g, dtype=torch.float64)
        memory = extend_memory(memory, principal, x.T @ x, 0.999)
        assert memory.shape[1] <= D - principal.shape[1]
        assert torch.allclose(memory.T @ memory, torch.eye(memory.shape[1], dtype=torch.float64), atol=1e-9)
        assert torch.allclose(principal.T @ memory, torch.zeros(1, memory.shape[1], dtype=torch.float64), atol=1e-9)
    assert memory.shape[1] == D - 1


def test_feature_statistics_stream_equals_one_shot_covariance():
    x = torch.randn(3, 4, D)
    stats = FeatureStatistics(D)
    stats.update(x[:2])
    stats.update(x[2:])
    rows = x.reshape(-1, D).double()
    assert torch.allclose(stats.covariance, rows.T @ rows, atol=1e-9)
    assert stats.count == 12


def _features(d, decay, seed, tokens=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens or 3 * d, d, generator=g, dtype=torch.float64) * torch.arange(1, d + 1, dtype=torch.float64) ** -decay
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return x @ rotation.T


def _explained(covariance, protected, new):
    residual = protected.project_out(protected.project_out(covariance).T)
    return (torch.trace(covariance) - torch.trace(residual) + torch.trace(new.T @ covariance @ new)) / torch.trace(covariance)


@pytest.mark.parametrize("protected_dim", [20, 150], ids=["basis", "complement"])
@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_randomized_solver_meets_the_criterion_with_about_the_exact_count(protected_dim, decay):
    d = 200
    x = _features(d, decay, 0)
    covariance = x.T @ x
    q, _ = torch.linalg.qr(torch.randn(d, protected_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    protected = Subspace.of(q)
    exact = memory_directions(covariance, protected, 0.99, solver="eigh")
    fast = memory_directions(covariance.float(), protected.to(torch.float32), 0.99, solver="randomized", seed=3)
    for new in (exact, fast.double()):
        assert torch.allclose(new.T @ new, torch.eye(new.shape[1], dtype=new.dtype), atol=1e-5)
        assert (new.T @ q).abs().max() < 1e-5
    # the criterion holds for the directions actually added (Rayleigh quotients are exact) ...
    assert _explained(covariance, protected, fast.double()) >= 0.99 - 1e-5
    # ... and they are hardly more than the exact eigenvectors need
    assert exact.shape[1] <= fast.shape[1] <= exact.shape[1] + max(2, exact.shape[1] // 20)


def test_eigh_solver_is_extend_memory_in_either_storage():
    x = _features(40, 0.7, 2)
    covariance = x.T @ x
    principal = torch.linalg.qr(torch.randn(40, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    reference = extend_memory(torch.zeros(40, 0, dtype=torch.float64), principal, covariance, 0.95)
    for protected in (Subspace(principal, complement=False), Subspace.of(principal)):
        new = memory_directions(covariance, protected, 0.95, solver="eigh")
        assert _span_equal(new, reference)


@pytest.mark.parametrize(("solver", "decay"), [("eigh", 0.7), ("randomized", 1.0), ("randomized", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_complement_stored_growth_gives_what_stays_unprotected(solver, decay, dtype):
    """Protected subspace stored by its complement R: `remaining` is an orthonormal basis of R's span less the new
    directions (what a state stored that way keeps instead of deriving it from them), for eigenvectors and for Ritz
    vectors (a decaying spectrum; a flat one falls back to eigh)."""
    d, k = 300, 160
    x = _features(d, decay, 4)
    covariance = (x.T @ x).to(dtype)
    q = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    protected = Subspace.of(q.to(dtype))
    assert protected.complement
    growth = grow_memory(covariance, protected, 0.99, solver=solver, seed=1)
    new, remaining = growth.directions.double(), growth.remaining.double()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert new.shape[1] > 0 and new.shape[1] + remaining.shape[1] == d - k
    both = torch.cat([new, remaining], dim=1)
    assert (both.T @ both - torch.eye(d - k, dtype=torch.float64)).abs().max() < tolerance
    assert (both.T @ q).abs().max() < tolerance
    # the same subspace as the complement derived from the directions (what a state did before)
    derived = orthogonal_complement(torch.cat([q, new], dim=1))
    assert torch.allclose(remaining @ remaining.T, derived @ derived.T, atol=10 * tolerance)
    assert torch.equal(growth.directions, memory_directions(covariance, protected, 0.99, solver=solver, seed=1))


@pytest.mark.parametrize("solver", ["eigh", "randomized"])
def test_a_basis_stored_growth_gives_what_stays_unprotected_once_that_is_the_narrower(solver):
    """Protected by its own basis (k < d/2): a flat spectrum needs many directions (the randomized solver falls back to
    eigh); once what stays unprotected is the narrower basis it comes with them, as a state then stores it."""
    d, k = 120, 50
    covariance = (lambda x: x.T @ x)(_features(d, 0.0, 8))
    q = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(9), dtype=torch.float64))[0]
    protected = Subspace.of(q)
    assert not protected.complement
    growth = grow_memory(covariance, protected, 0.99, solver=solver, seed=1)
    new, remaining = growth.directions, growth.remaining
    assert 2 * remaining.shape[1] < d and new.shape[1] + remaining.shape[1] == d - k
    both = torch.cat([q, new, remaining], dim=1)
    assert (both.T @ both - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-12
    assert grow_memory(covariance, protected, 0.3, solver=solver, seed=1).remaining is None  # still the wider


@pytest.mark.parametrize("solver", ["eigh", "randomized"])
def test_statistics_gathered_in_the_complement_coordinates_grow_the_same_memory(solver):
    """`ResidualStatistics` over a complement basis R holds `R^T C R` and `trace(C)` of the rows it sees, and the memory
    solve on it gives what it gives on the whole second moment."""
    d, k = 300, 160
    x = _features(d, 1.0, 6, tokens=900)
    q = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]
    protected = Subspace.of(q)
    coords = protected.complement_basis()
    full, projected = FeatureStatistics(d), ResidualStatistics(coords, torch.float64)
    for rows in x.split(128):
        full.update(rows)
        projected.update(rows.reshape(2, -1, d) if rows.shape[0] % 2 == 0 else rows)
    residual = projected.covariance
    assert projected.count == full.count == 900
    assert torch.allclose(residual.matrix, coords.T @ full.covariance @ coords, rtol=1e-10, atol=1e-8)
    assert torch.allclose(residual.total, torch.trace(full.covariance), rtol=1e-12)
    a = grow_memory(full.covariance, protected, 0.99, solver=solver, seed=2)
    b = grow_memory(residual, protected, 0.99, solver=solver, seed=2)
    assert a.directions.shape == b.directions.shape and a.directions.shape[1] > 0
    assert _span_equal(a.directions, b.directions) and _span_equal(a.remaining, b.remaining)


def test_a_residual_covariance_needs_the_complement_it_was_gathered_in():
    q = torch.linalg.qr(torch.randn(40, 10, dtype=torch.float64))[0]
    residual = ResidualCovariance(torch.eye(30, dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="stored by its 30-column complement"):
        grow_memory(residual, Subspace(q, complement=False), 0.99)
    with pytest.raises(ValueError, match="shape \\(30, 30\\)"):
        grow_memory(residual, Subspace.of(torch.linalg.qr(torch.randn(40, 25, dtype=torch.float64))[0]), 0.99)


def test_float32_statistics_are_within_1e_6_of_float64():
    x = torch.randn(5, 300, D * 20)
    fast, exact = FeatureStatistics(D * 20, dtype=torch.float32), FeatureStatistics(D * 20)
    for batch in x:
        fast.update(batch)
        exact.update(batch)
    assert (fast.covariance.double() - exact.covariance).norm() / exact.covariance.norm() < 1e-6


def test_blocked_statistics_of_wide_inputs_equal_the_full_product():
    """From d_in = 1024 only the upper block triangle is accumulated; the mirrored result is the same covariance."""
    x = torch.randn(3, 50, 1030, dtype=torch.float64)
    stats = FeatureStatistics(1030)
    for batch in x:
        stats.update(batch)
    stats.update_covariance(torch.eye(1030, dtype=torch.float64), count=0)
    stats.update(x[0])
    rows = torch.cat([x.reshape(-1, 1030), x[0]])
    expected = rows.T @ rows + torch.eye(1030, dtype=torch.float64)
    assert torch.allclose(stats.covariance, expected, atol=1e-9)
    assert stats.count == 200
