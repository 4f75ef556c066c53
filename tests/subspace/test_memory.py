import torch

from keeplora_hf.subspace import FeatureStatistics, extend_memory

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
