"""The gradient sketch against the exact residual gradient's SVD: exact where it should be, bounded error elsewhere."""

import pytest
import torch

from keeplora_hf.subspace import GradientSketch, Subspace, residual_directions


def _orthonormal(d, k, seed):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _gradient_data(d_out, d_in, decay, seed=0, tokens=3000):
    """Token inputs and output gradients whose summed gradient `g^T x` has a power-law spectrum of exponent `decay`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g) * torch.arange(1, d_in + 1).float() ** -decay
    mix = torch.randn(d_in, d_out, generator=g) / d_in**0.5
    noise = torch.randn(tokens, d_out, generator=g) * torch.arange(1, d_out + 1).float() ** -decay
    grads = (x @ mix + 0.5 * noise) / tokens
    return x, grads


def _sketch(x, grads, rank, oversampling, seed=3):
    sketch = GradientSketch(grads.shape[1], x.shape[1], rank, oversampling, seed=seed)
    for xs, gs in zip(x.split(500), grads.split(500)):
        sketch.update(xs, gs)
    return sketch


def _captured(gradient, protected, rows):
    residual = protected.project_out(gradient)
    return (residual @ rows.T).square().sum().item()


def test_sketch_is_psi_times_the_summed_gradient():
    x, grads = _gradient_data(40, 30, 0.5)
    sketch = _sketch(x, grads, 4, 6)
    gradient = grads.double().T @ x.double()
    assert sketch.sketch.shape == (10, 30)
    assert torch.allclose(sketch.psi.double() @ sketch.psi.double().T, torch.eye(10, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(sketch.sketch.double(), sketch.psi.double() @ gradient, rtol=1e-4, atol=1e-7)


def test_sketch_as_wide_as_the_output_is_the_exact_computation():
    x, grads = _gradient_data(24, 40, 0.2)
    protected = Subspace(_orthonormal(40, 10, 1), complement=False)
    rows = _sketch(x, grads, 4, 64).residual_directions(protected, 4)
    exact = residual_directions(grads.double().T @ x.double(), protected, 4)
    assert torch.allclose(rows.T @ rows, exact.T @ exact, atol=1e-5)


def test_low_rank_gradient_is_recovered_exactly():
    """A gradient of rank <= r (few tokens, as in a small task) has its whole row space in the sketch."""
    x, grads = _gradient_data(300, 200, 0.0, tokens=6)
    protected = Subspace(_orthonormal(200, 50, 2), complement=False)
    rows = _sketch(x, grads, 6, 10).residual_directions(protected, 6)
    exact = residual_directions(grads.double().T @ x.double(), protected, 6)
    assert torch.allclose(rows.T @ rows, exact.T @ exact, atol=1e-5)


@pytest.mark.parametrize(
    ("d_out", "d_in", "decay", "bound"),
    [
        # a decaying spectrum, like most layers' mean gradients (benchmarks/accuracy.py measures real ones)
        (256, 384, 0.5, 0.97),
        (384, 256, 1.0, 0.999),
        # a flat spectrum: the hardest case for any single-pass sketch; still within 15% of the best rank-r rows
        (256, 384, 0.3, 0.85),
    ],
)
def test_captured_gradient_energy_is_close_to_the_exact_svd(d_out, d_in, decay, bound):
    x, grads = _gradient_data(d_out, d_in, decay)
    protected = Subspace.of(_orthonormal(d_in, d_in // 4, 4))
    gradient = grads.double().T @ x.double()
    exact = residual_directions(gradient, protected, 16)
    for seed in range(3):
        rows = _sketch(x, grads, 16, 64, seed=seed).residual_directions(protected, 16)
        assert (rows @ protected.basis()).abs().max() < 1e-10
        assert torch.allclose(rows @ rows.T, torch.eye(16, dtype=rows.dtype), atol=1e-10)
        assert _captured(gradient, protected, rows) >= bound * _captured(gradient, protected, exact)


def test_complement_storage_gives_the_same_directions():
    x, grads = _gradient_data(64, 48, 0.5)
    basis = _orthonormal(48, 36, 5)
    as_basis = _sketch(x, grads, 4, 10).residual_directions(Subspace(basis, complement=False), 4)
    as_complement = _sketch(x, grads, 4, 10).residual_directions(Subspace.of(basis), 4)
    assert torch.allclose(as_basis.T @ as_basis, as_complement.T @ as_complement, atol=1e-8)


def test_zero_gradient_and_small_residual_still_give_valid_rows():
    protected = Subspace.of(_orthonormal(12, 9, 6))
    sketch = GradientSketch(8, 12, 5, 2, seed=0)  # nothing accumulated: the gradient is zero
    rows = sketch.residual_directions(protected, 5)
    assert rows.shape == (5, 12)
    assert torch.allclose(rows[:3] @ rows[:3].T, torch.eye(3, dtype=rows.dtype), atol=1e-10)
    assert torch.count_nonzero(rows[3:]) == 0
    assert (rows @ protected.basis()).abs().max() < 1e-10


def test_layers_of_one_shape_share_one_psi_and_each_sketch_is_psi_times_its_gradient():
    """A pass holds one test matrix per (rows, d_out), not one per target; each layer's sketch is still `Psi G`."""
    from keeplora_hf.subspace.sketch import SketchMatrices

    shared = SketchMatrices(seed=11)
    (x1, g1), (x2, g2) = _gradient_data(40, 30, 0.5, seed=1), _gradient_data(40, 30, 0.5, seed=2)
    first = GradientSketch(40, 30, 4, 6, seed=1, shared=shared)
    second = GradientSketch(40, 30, 4, 6, seed=2, shared=shared)
    other_width = GradientSketch(50, 30, 4, 6, seed=3, shared=shared)
    assert first.psi is second.psi and other_width.psi.shape == (10, 50)
    for sketch, x, grads in ((first, x1, g1), (second, x2, g2)):
        sketch.update(x, grads)
        gradient = grads.double().T @ x.double()
        assert torch.allclose(sketch.sketch.double(), first.psi.double() @ gradient, rtol=1e-4, atol=1e-7)
    assert torch.allclose(first.psi.double() @ first.psi.double().T, torch.eye(10, dtype=torch.float64), atol=1e-6)
