"""The weight interventions: a snapshot that puts the target weights back bit for bit, their spectra, and the
principal-only, residual-only and residual-noise replacements made from them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..subspace.principal import COMPUTE_DTYPE, principal_rank

__all__ = ["LayerSpectrum", "WeightSnapshot", "perturb_residual", "principal_only", "residual_only", "target_spectra"]

# CPU SVDs of matrices up to this size run on one thread: faster than several, by far on a loaded machine
_SMALL_SVD = 1 << 20


class WeightSnapshot:
    """A copy of the target weights, taken once, that `restore` puts back bit for bit."""

    def __init__(self, modules: Mapping[str, nn.Linear]) -> None:
        self.modules = dict(modules)
        self.original = {n: m.weight.detach().to("cpu", copy=True) for n, m in self.modules.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, module in self.modules.items():
            module.weight.data.copy_(self.original[name])

    def identical(self) -> bool:
        return all(torch.equal(m.weight.detach().cpu(), self.original[n]) for n, m in self.modules.items())

    @torch.no_grad()
    def set(self, name: str, weight: torch.Tensor) -> None:
        target = self.modules[name].weight
        target.data.copy_(weight.to(device=target.device, dtype=target.dtype))

    @contextlib.contextmanager
    def intervention(self) -> Iterator[WeightSnapshot]:
        """Change weights inside the block; they are restored on the way out, whatever happens."""
        try:
            yield self
        finally:
            self.restore()


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class LayerSpectrum:
    """The SVD of one weight (`d_out x d_in`) that the interventions need: singular values and right vectors.

    The decomposition runs in float64 (as the method's `principal_basis`); `vh` is stored in float32 to bound memory
    on large models, and projections are computed in float64.
    """

    singular: torch.Tensor  # (k,) float64, descending
    vh: torch.Tensor  # (k, d_in)
    shape: tuple[int, int]

    @classmethod
    def of(cls, weight: torch.Tensor) -> LayerSpectrum:
        small_on_cpu = weight.device.type == "cpu" and weight.numel() <= _SMALL_SVD
        with _threads(1) if small_on_cpu else contextlib.nullcontext():
            _, singular, vh = torch.linalg.svd(weight.detach().to(COMPUTE_DTYPE), full_matrices=False)
        return cls(singular.cpu(), vh.to(torch.float32).cpu(), tuple(weight.shape))

    def rank(self, energy: float) -> int:
        return principal_rank(self.singular.square(), energy)

    def principal_part(self, weight: torch.Tensor, energy: float) -> torch.Tensor:
        """`W V_p V_pᵀ`: `W` restricted to its `energy` principal subspace (= `U_p Σ_p V_pᵀ` for the weight's own SVD)."""
        basis = self.vh[: self.rank(energy)].to(device=weight.device, dtype=COMPUTE_DTYPE).T
        w = weight.to(COMPUTE_DTYPE)
        return (w @ basis) @ basis.T

    def residual_part(self, weight: torch.Tensor, energy: float) -> torch.Tensor:
        return weight.to(COMPUTE_DTYPE) - self.principal_part(weight, energy)

    def residual_noise(self, weight: torch.Tensor, energy: float, scale: float, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise projected onto the residual subspace, with Frobenius norm `scale * ||W||_F`."""
        noise = torch.randn(weight.shape, generator=generator, dtype=COMPUTE_DTYPE)
        basis = self.vh[: self.rank(energy)].to(COMPUTE_DTYPE).T
        noise = noise - (noise @ basis) @ basis.T
        norm = noise.norm()
        if norm == 0:
            return noise
        return noise * (scale * weight.to(COMPUTE_DTYPE).norm().cpu() / norm)


def target_spectra(snapshot: WeightSnapshot) -> dict[str, LayerSpectrum]:
    """SVDs of the original weights, computed where the model lives (a GPU when it has one)."""
    return {name: LayerSpectrum.of(module.weight) for name, module in snapshot.modules.items()}


def _original_on_device(snapshot: WeightSnapshot, name: str) -> torch.Tensor:
    return snapshot.original[name].to(snapshot.modules[name].weight.device)


def principal_only(snapshot: WeightSnapshot, spectra: Mapping[str, LayerSpectrum], names: Sequence[str], energy: float) -> None:
    for name in names:
        snapshot.set(name, spectra[name].principal_part(_original_on_device(snapshot, name), energy))


def residual_only(snapshot: WeightSnapshot, spectra: Mapping[str, LayerSpectrum], names: Sequence[str], energy: float) -> None:
    for name in names:
        snapshot.set(name, spectra[name].residual_part(_original_on_device(snapshot, name), energy))


def perturb_residual(
    snapshot: WeightSnapshot, spectra: Mapping[str, LayerSpectrum], names: Sequence[str], energy: float, scale: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        original = snapshot.original[name]
        noise = spectra[name].residual_noise(original, energy, scale, generator)
        snapshot.set(name, original.to(COMPUTE_DTYPE) + noise)
