"""A single-pass sketch of a layer's weight gradient: its top right singular vectors without ever forming it.

The mean weight gradient of a linear layer over a task's batches is `G = sum_t g_t^T x_t` (`x_t` the layer's input
rows, `g_t` the loss gradient of its output rows, summed over tokens and batches). `A` needs the top-`r` right singular
vectors of the residual gradient `G' = G (I - P P^T)`. Instead of `G` (`d_out x d_in`), each layer accumulates

    X = Psi G = sum_t (g_t Psi^T)^T x_t          (`l x d_in`, `l = r + oversampling`)

with `Psi` an `l x d_out` random matrix with orthonormal rows, and `A` is taken as the top-`r` right singular vectors of
`X (I - P P^T) = Psi G'`. Its row space is the randomised range finder of `G'^T` (Halko, Martinsson & Tropp 2011, with
`Psi^T` as test matrix), and `X^T X = G'^T Psi^T Psi G'` is a compression of `G'^T G'` whose top eigenvectors approach
those of `G'` as `l` grows ("sketch and solve"). It is exact when `l >= d_out` (`Psi` is then the identity), and its
error shrinks with the gradient's spectral decay: tests/subspace/test_sketch.py bounds the captured gradient energy
`||G' A^T||_F^2` against the exact SVD's.

Memory per layer is `l * d_in` floats instead of `d_out * d_in`, plus one `Psi` per distinct `(l, d_out)` shared by every
layer of that shape (`SketchMatrices`: each layer's guarantee needs only that `Psi` is drawn independently of its own
gradient, so layers may share one); the cost per token is `l * (d_in + d_out)` multiply-adds instead of `d_in * d_out`.
`X` is linear in `G`, so batches and data-parallel ranks are summed exactly.
"""

from __future__ import annotations

import torch

from .basis import Subspace
from .principal import COMPUTE_DTYPE
from .residual import right_singular_vectors, rows_in_residual

SKETCH_DTYPE = torch.float32


def sketch_rows(rank: int, oversampling: int, d_out: int) -> int:
    """Rows `l` of the co-range sketch: `rank + oversampling`, at most `d_out` (where the sketch is exact)."""
    return min(rank + oversampling, d_out)


def sketch_matrix(rows: int, d_out: int, seed: int) -> torch.Tensor:
    """`rows x d_out` with orthonormal rows, drawn from `seed` (the identity when `rows == d_out`)."""
    if rows >= d_out:
        return torch.eye(d_out, dtype=SKETCH_DTYPE)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_out, rows, generator=generator, dtype=SKETCH_DTYPE))
    return q.T.contiguous()


class SketchMatrices:
    """One `Psi` per `(rows, d_out, device)`, drawn from `seed` on first use and shared by the layers of that shape: a
    pass over a model with hundreds of targets holds a few test matrices, not one per target."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._drawn: dict[tuple[int, int, str], torch.Tensor] = {}

    def get(self, rows: int, d_out: int, device: torch.device | str) -> torch.Tensor:
        key = (rows, d_out, str(device))
        if key not in self._drawn:
            self._drawn[key] = sketch_matrix(rows, d_out, self.seed + d_out).to(device)
        return self._drawn[key]


class GradientSketch:
    """The co-range sketch `Psi G` of one layer's weight gradient, accumulated from `(inputs, output_grads)`.

    `seed` fixes `Psi` (and the rows `residual_directions` adds where the residual is too narrow), so every data-parallel
    rank draws the same one and the sums can be all-reduced; `shared` gives the layer a `Psi` it shares with the
    other layers of its shape instead.
    """

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int,
        oversampling: int,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        shared: SketchMatrices | None = None,
    ) -> None:
        rows = sketch_rows(rank, oversampling, d_out)
        self.exact = rows >= d_out
        if self.exact:
            self.psi = None  # the identity: `update` adds `g^T x` itself
        elif shared is not None:
            self.psi = shared.get(rows, d_out, device)
        else:
            self.psi = sketch_matrix(rows, d_out, seed).to(device)
        self.sketch = torch.zeros(rows, d_in, dtype=SKETCH_DTYPE, device=device)
        self.seed = seed

    def update(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        """Add one batch's `Psi sum_t g_t^T x_t` (any leading shape; the last dims are d_in and d_out)."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(SKETCH_DTYPE)
        g = output_grads.detach().reshape(-1, output_grads.shape[-1]).to(SKETCH_DTYPE)
        projected = g.T if self.exact else self.psi @ g.T
        self.sketch.addmm_(projected, x)

    def residual_directions(self, protected: Subspace, rank: int) -> torch.Tensor:
        """`rank x d_in` rows of `A`: the top right singular vectors of the sketched residual gradient, `A P = 0`."""
        residual = protected.project_out(self.sketch.to(COMPUTE_DTYPE))
        singular, vh = right_singular_vectors(residual)
        return rows_in_residual(vh, singular, protected, rank, seed=self.seed)
