"""Per-layer continual state of KeepLoRA++, carried by each targeted LoRA `Linear`, and its layer scale."""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..subspace.basis import WORK_DTYPE, Subspace, orthogonal_complement, orthonormalize
from ..subspace.principal import principal_basis, ritz_energies

STATE_ATTR = "keeplora_state"


@dataclass
class FinishedTask:
    """One learned task's rank-r update of a layer: `delta_W = scaling * lora_B @ lora_A` (float32)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


class KeepLoRALayerState:
    """What one layer remembers across tasks.

    The protected subspace of a layer is `[principal, memory]`: `principal` (`d_in x p`) comes from the original
    pre-trained weight and never changes; `memory` (`d_in x m`, orthogonal to it) grows after each task. Of the memory
    and the residual subspace (`d_in - p - m` dimensions) the state stores the narrower, in the configured
    `state_dtype`; the other is derived from it when asked for (nothing in the training path asks). Three layouts:

    - bases: `principal` and `memory` (`(p + m) * d_in` values);
    - principal + complement (`keep_principal_basis=True`): `principal` and `complement`, an orthonormal basis of
      the residual subspace, once the memory is wider than the residual (`(p + d_in - k) * d_in` values, `k = p + m`);
    - complement alone (the default, `keep_principal_basis=False`): once `k > d_in - k`, only `complement` and the
      `p` energies of the principal directions, the original weight's top `p` squared singular values
      (`(d_in - k) * d_in + p` values). The principal basis is a pure function of the original weight (the base
      weight minus the merged `tasks`), so `principal` recomputes it when asked for.

    `tasks` is the history that rebuilds base + merged tasks exactly.
    """

    def __init__(
        self,
        principal: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        tasks: list[FinishedTask] | None = None,
        *,
        complement: torch.Tensor | None = None,
        principal_energies: torch.Tensor | None = None,
    ) -> None:
        if memory is not None and complement is not None:
            raise ValueError("a layer state holds either its memory or the complement of its protected subspace")
        if complement is not None and principal is None and principal_energies is None:
            raise ValueError("a layer state that holds only the complement needs the principal energies")
        self._principal = principal
        self._memory = memory
        self.complement = complement
        self.principal_energies = principal_energies
        self.tasks: list[FinishedTask] = [] if tasks is None else tasks
        self._subspace: Subspace | None = None
        self._origin: tuple[weakref.ref, str] | None = None

    def __repr__(self) -> str:
        layout = "bases" if self.complement is None else "complement" if self._principal is None else "principal+complement"
        return f"KeepLoRALayerState(p={self.principal_rank}, m={self.memory_rank}, stored_as={layout}, tasks={len(self.tasks)})"

    def bind(self, module: LoraLayer, principal_solver: str) -> None:
        """Remember where the principal basis comes from, to recompute it once only the complement is stored."""
        self._origin = (weakref.ref(module), principal_solver)

    # -- what is protected -----------------------------------------------------------------------------------

    @property
    def initialised(self) -> bool:
        """Whether the principal basis has been computed (by the first begin_task)."""
        return self._principal is not None or self.complement is not None

    @property
    def principal(self) -> torch.Tensor | None:
        """Orthonormal principal basis (`d_in x p`); recomputed from the original weight if the state dropped it."""
        if self._principal is None and self.complement is not None:
            return self._recomputed_principal()
        return self._principal

    @principal.setter
    def principal(self, value: torch.Tensor | None) -> None:
        if self.complement is not None:
            raise RuntimeError("this state stores the complement of its protected subspace; its principal basis is fixed")
        self._principal, self._subspace = value, None

    @property
    def stored_principal(self) -> torch.Tensor | None:
        """The principal basis if the state holds it (never recomputed)."""
        return self._principal

    @property
    def memory(self) -> torch.Tensor | None:
        """Orthonormal memory basis (`d_in x m`); derived from the principal and complement bases when those are stored."""
        if self.complement is None:
            return self._memory
        principal = self.principal.to(WORK_DTYPE)
        memory = orthogonal_complement(torch.cat([principal, self.complement.to(WORK_DTYPE)], dim=1))
        return memory.to(self.complement.dtype)

    @memory.setter
    def memory(self, value: torch.Tensor | None) -> None:
        if self.complement is not None:
            raise RuntimeError("this state stores the complement of its protected subspace; its memory is derived")
        self._memory, self._subspace = value, None

    @property
    def d_in(self) -> int:
        stored = self.complement if self.complement is not None else self._principal
        return 0 if stored is None else stored.shape[0]

    @property
    def principal_rank(self) -> int:
        if self._principal is not None:
            return self._principal.shape[1]
        return 0 if self.principal_energies is None else self.principal_energies.numel()

    @property
    def memory_rank(self) -> int:
        if self.complement is not None:
            return self.d_in - self.principal_rank - self.complement.shape[1]
        return 0 if self._memory is None else self._memory.shape[1]

    @property
    def protected_rank(self) -> int:
        return self.principal_rank + self.memory_rank

    def stored_values(self) -> int:
        """Numbers held for the protected subspace (see the layouts in the class docstring)."""
        stored = [t for t in (self._principal, self._memory, self.complement) if t is not None]
        if self._principal is None and self.complement is not None and self.principal_energies is not None:
            stored.append(self.principal_energies)
        return sum(t.numel() for t in stored)

    def protected(self) -> torch.Tensor:
        """An orthonormal basis of the protected subspace (`d_in x k`): `[principal, memory]`, or, when only the
        complement is stored, the basis of its orthogonal complement (the same subspace, with no recomputation)."""
        if not self.initialised:
            raise RuntimeError("the principal basis has not been computed yet: call begin_task first")
        if self.complement is not None and self._principal is None:
            return orthogonal_complement(self.complement.to(WORK_DTYPE)).to(self.complement.dtype)
        if self.complement is not None:
            return torch.cat([self._principal, self.memory.to(self._principal.dtype)], dim=1)
        if self._memory is None or self._memory.shape[1] == 0:
            return self._principal
        return torch.cat([self._principal, self._memory.to(self._principal.dtype)], dim=1)

    def subspace(self) -> Subspace:
        """The protected subspace for computing (float32), by whichever basis the state stores; cached."""
        if not self.initialised:
            raise RuntimeError("the principal basis has not been computed yet: call begin_task first")
        if self._subspace is None:
            # low-precision bases are re-orthonormalised in float32 by Subspace, so projections are exact for them
            stored, complement = (self.complement, True) if self.complement is not None else (self.protected(), False)
            if stored.dtype == torch.float64:
                stored = stored.to(WORK_DTYPE)
            self._subspace = Subspace(stored, complement=complement)
        return self._subspace

    def _recomputed_principal(self) -> torch.Tensor:
        """The principal basis of the original weight (base weight minus merged tasks), inside the protected subspace."""
        solver = self._origin[1] if self._origin is not None else "svd"
        rank = self.principal_rank
        basis, energies = principal_basis(self._original_weight(), 1.0, solver=solver, return_energies=True, rank=rank)
        expected = self.principal_energies
        if basis.shape[1] != self.principal_rank or (
            expected is not None
            and expected.numel()
            and abs(float(energies.sum()) - float(expected.sum())) > 1e-2 * float(expected.sum())
        ):
            raise RuntimeError(
                f"the principal basis recomputed from this layer's original weight (p={basis.shape[1]}) does not match "
                f"the stored one (p={self.principal_rank}): the base weights are not those the state was built on"
            )
        # rounding in (base + tasks) - tasks moves it by ~1e-7: put it back inside the protected subspace
        complement = Subspace(self.complement.to(torch.float64), complement=True)
        basis = orthonormalize(complement.project_onto(basis.T.to(torch.float64)).T)
        return basis.to(self.complement.dtype)

    def _original_weight(self) -> torch.Tensor:
        """The layer's pre-trained weight in float32: its base weight minus the merged tasks, newest first."""
        module = self._origin[0]() if self._origin is not None else None
        if module is None:
            raise RuntimeError(
                "this layer state stores the complement of its protected subspace and is not attached to its layer, so "
                "its principal basis cannot be recomputed"
            )
        original = module.get_base_layer().weight.detach().float().clone()
        for task in reversed(self.tasks):
            original -= task.delta().to(original.device)
        return original

    # -- how it changes ----------------------------------------------------------------------------------------

    def add_memory(self, new: torch.Tensor, dtype: torch.dtype, *, keep_principal: bool = True) -> None:
        """Append orthonormal directions (`d_in x n`, orthogonal to what is protected) to the memory, in `dtype`.

        Switches to storing the complement once that is the narrower basis: of the memory (`keep_principal`), or of
        the whole protected subspace (the principal basis is then dropped, also by a state that kept it so far, and
        recomputed when asked for).
        """
        if not self.initialised:
            raise RuntimeError("the principal basis has not been computed yet: call begin_task first")
        self._subspace = None
        if self.complement is not None:
            if new.shape[1]:
                residual = self.complement.to(torch.float64)
                inside = residual.T @ new.to(residual.dtype)  # new directions in the complement's coordinates
                self.complement = (residual @ orthogonal_complement(orthonormalize(inside))).to(dtype)
            else:
                self.complement = self.complement.to(dtype)
            if self._principal is not None and keep_principal:
                self._principal = self._principal.to(dtype)
            elif self._principal is not None:  # kept so far, e.g. an adapter saved before this default: drop it now
                self._drop_principal()
            return
        memory = self._memory if self._memory is not None else new.new_zeros(self.d_in, 0)
        memory = torch.cat([memory.to(new.dtype), new], dim=1)
        p, m = self.principal_rank, memory.shape[1]
        left = self.d_in - p - m
        if (m if keep_principal else p + m) > left:
            basis = torch.cat([self._principal.to(torch.float64), memory.to(torch.float64)], dim=1)
            self.complement = orthogonal_complement(basis).to(dtype)
            if keep_principal:
                self._principal = self._principal.to(dtype)
            else:
                self._drop_principal()
            self._memory = None
        else:
            self._principal = self._principal.to(dtype)
            self._memory = memory.to(dtype)

    def _drop_principal(self) -> None:
        """Keep only the principal energies from here on; the basis is recomputed when asked for."""
        if self.principal_energies is None:  # a state saved before energies were kept, or with its basis: measure them
            self.principal_energies = ritz_energies(self._original_weight(), self._principal)
        self._principal = None

    def to_(self, device: torch.device | str) -> None:
        """Move the bases to `device` (in place)."""
        for name in ("_principal", "_memory", "complement"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self._subspace = None

    def cast_(self, dtype: torch.dtype) -> None:
        """Store the bases in `dtype` (in place)."""
        for name in ("_principal", "_memory", "complement"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(dtype))
        self._subspace = None


def layer_state(module: LoraLayer, adapter_name: str) -> KeepLoRALayerState:
    states = module.__dict__.setdefault(STATE_ATTR, {})
    return states.setdefault(adapter_name, KeepLoRALayerState())


def has_layer_state(module: nn.Module, adapter_name: str) -> bool:
    return isinstance(module, LoraLayer) and adapter_name in module.__dict__.get(STATE_ATTR, {})


def apply_delta_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """Merge a float32 update into a base weight. Used for training and for reloading, so both give the same bits."""
    weight.data.add_(delta.to(device=weight.device, dtype=weight.dtype))


_INDEX = re.compile(r"^\d+$")


def layer_scales(model: nn.Module, names: list[str], gamma: float) -> dict[str, float]:
    """KeepLoRA++'s `s_l = gamma + (1 - gamma) * l / (L - 1)` for each target, depth counted per transformer stack.

    A stack is the outermost `nn.ModuleList` on a target's path (so a vision tower and a language model are counted
    separately, and experts inside a layer do not count as depth). Targets outside any stack get 1.0.
    """
    modules = dict(model.named_modules())
    scales = {}
    for name in names:
        parts = name.split(".")
        scale = 1.0
        for i in range(1, len(parts) - 1):
            container = modules.get(".".join(parts[:i]))
            if isinstance(container, nn.ModuleList) and _INDEX.match(parts[i]):
                depth, count = int(parts[i]), len(container)
                if count > 1:
                    scale = gamma + (1.0 - gamma) * depth / (count - 1)
                break
        scales[name] = scale
    return scales
