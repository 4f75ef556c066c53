import pytest
import torch

from keeplora_hf.subspace import Subspace, orthogonal_complement


def _orthonormal(d, k, seed=0, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.to(dtype)


@pytest.mark.parametrize("k", [0, 1, 5, 9, 10])
def test_orthogonal_complement_is_orthonormal_and_orthogonal(k):
    basis = _orthonormal(10, k)
    complement = orthogonal_complement(basis)
    assert complement.shape == (10, 10 - k)
    assert torch.allclose(complement.T @ complement, torch.eye(10 - k, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis.T @ complement, torch.zeros(k, 10 - k, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("k", [2, 8])
def test_subspace_stores_the_narrower_basis_and_projects_the_same(k):
    basis = _orthonormal(10, k)
    subspace = Subspace.of(basis)
    assert subspace.span == k
    assert subspace.stored.shape[1] == min(k, 10 - k)
    assert subspace.complement == (k > 5)
    rows = torch.randn(4, 10, dtype=torch.float64)
    expected = rows - rows @ basis @ basis.T
    assert torch.allclose(subspace.project_out(rows), expected, atol=1e-12)
    assert torch.allclose(subspace.project_onto(rows), rows @ basis @ basis.T, atol=1e-12)
    assert torch.allclose(subspace.basis() @ subspace.basis().T, basis @ basis.T, atol=1e-12)


def test_low_precision_storage_is_reorthonormalised_so_projection_is_exact():
    stored = _orthonormal(64, 20).to(torch.bfloat16)
    subspace = Subspace(stored, complement=False)
    assert subspace.stored.dtype == torch.float32
    # exact for the subspace that was stored (the span of the bfloat16 columns)
    rows = torch.randn(8, 64)
    out = subspace.project_out(rows)
    assert (out @ stored.float()).abs().max() < 1e-4 * rows.abs().max()
