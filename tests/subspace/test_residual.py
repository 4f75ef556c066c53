import torch

from keeplora_hf.subspace import residual_directions


def _orthonormal(d, k, seed):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_rows_are_the_top_singular_vectors_of_the_projected_gradient():
    protected = _orthonormal(10, 3, 0)
    gradient = torch.randn(8, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = residual_directions(gradient, protected, 2)
    assert torch.allclose(rows @ protected, torch.zeros(2, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rows @ rows.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    projected = gradient - gradient @ protected @ protected.T
    _, _, vh = torch.linalg.svd(projected)
    assert torch.allclose(rows.T @ rows, vh[:2].T @ vh[:2], atol=1e-9)


def test_rank_deficient_gradient_is_completed_inside_the_residual():
    protected = _orthonormal(10, 3, 0)
    gradient = torch.outer(torch.randn(8, dtype=torch.float64), torch.randn(10, dtype=torch.float64))  # rank 1
    rows = residual_directions(gradient, protected, 4)
    assert torch.allclose(rows @ protected, torch.zeros(4, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rows @ rows.T, torch.eye(4, dtype=torch.float64), atol=1e-10)


def test_residual_smaller_than_rank_zero_fills():
    protected = _orthonormal(6, 4, 0)
    gradient = torch.randn(5, 6, dtype=torch.float64)
    rows = residual_directions(gradient, protected, 3)
    assert rows.shape == (3, 6)
    assert torch.allclose(rows[:2] @ rows[:2].T, torch.eye(2, dtype=torch.float64), atol=1e-10)
    assert torch.count_nonzero(rows[2]) == 0
    assert torch.allclose(rows @ protected, torch.zeros(3, 4, dtype=torch.float64), atol=1e-12)
