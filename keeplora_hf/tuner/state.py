"""What one targeted layer remembers across tasks (`KeepLoRALayerState`), its finished tasks (`finished.py`) included.

The state is an `nn.Module` whose tensors are (non-persistent) buffers, in a `ModuleDict` named `keeplora_state` on
the LoRA layer (`tuner/layer.py` attaches it): `.to()`, `.cuda()`, accelerate's device maps and `delete_adapter` see
it like any adapter weight. It is saved in the adapter file by `tuner/state_io.py` in its own format, because its
shapes grow from task to task, which a plain `load_state_dict` cannot follow. Moving the model moves the state to the
new device but never changes its dtype: `model.to(torch.bfloat16)` leaves the bases in `state_dtype` and finished
tasks in float32.
"""

from __future__ import annotations

import weakref

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..subspace.basis import EXACT_DTYPES, WORK_DTYPE, Subspace, orthogonal_complement, orthonormalize
from ..subspace.principal import principal_basis, principal_source, ritz_energies
from .finished import TASK_DTYPE, FinishedTask, FrozenBranch, merged_delta
from .weights import apply_delta_, base_weight, is_quantized

#: the buffers that describe the protected subspace: the ones a state sharded by layer keeps on one rank only
BASIS_BUFFERS = ("_principal", "_memory", "complement", "principal_energies")
#: a basis buffer's shape and dtype (None: the state does not store it), the same on every rank
Layout = dict[str, "tuple[tuple[int, ...], torch.dtype] | None"]


class KeepLoRALayerState(nn.Module):
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
      weight minus the merged tasks), so `principal` recomputes it when asked for.

    In a run whose base is fully sharded (FSDP2, ZeRO-3) the bases are sharded by layer (`tuner/state_sharding.py`):
    on the ranks that do not own the layer, the basis buffers are `meta` tensors that keep only their shapes and dtypes
    (`held` is False), and everything that reads the bases refuses there.

    Finished tasks are stacked (`finished_A`: `R x d_in`, `finished_B`: `d_out x R`, float32, `R` the sum of their
    ranks). The first `merged_tasks` of them were added into the base weight; the others act through a frozen
    branch, `branch(x)`, added to the base layer's output by the hooks of `tuner/layer.py` (see `finished_tasks` in the
    config).
    """

    def __init__(
        self,
        principal: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        tasks: list[FinishedTask] | None = None,
        *,
        complement: torch.Tensor | None = None,
        principal_energies: torch.Tensor | None = None,
        merged_tasks: int | None = None,
    ) -> None:
        super().__init__()
        if memory is not None and complement is not None:
            raise ValueError("a layer state holds either its memory or the complement of its protected subspace")
        if complement is not None and principal is None and principal_energies is None:
            raise ValueError("a layer state that holds only the complement needs the principal energies")
        for name, value in (
            ("_principal", principal),
            ("_memory", memory),
            ("complement", complement),
            ("principal_energies", principal_energies),
            ("finished_A", None),
            ("finished_B", None),
            ("fingerprint", None),
            ("task_probe", None),  # the base response at begin_task, for end_task's truth check (`truth.py`)
        ):
            self.register_buffer(name, value, persistent=False)
        self._task_ranks: list[int] = []
        self._task_scalings: list[float] = []
        self.tasks = [] if tasks is None else tasks
        self.merged_tasks = len(self._task_ranks) if merged_tasks is None else merged_tasks
        # a task under way here (the warning of `tuner/layer.py`); foreign hooks at its start (`tuner/truth.py`)
        self.task_open, self.task_hooks = False, None
        self._subspace: Subspace | None = None
        self._branch: FrozenBranch | None = None
        self._origin: tuple[weakref.ref, str, str] | None = None  # (layer, principal_solver, principal_side)

    def extra_repr(self) -> str:
        layout = "bases" if self.complement is None else "complement" if self._principal is None else "principal+complement"
        tasks = f"tasks={len(self._task_ranks)}, merged={self.merged_tasks}"
        return f"p={self.principal_rank}, m={self.memory_rank}, stored_as={layout}, {tasks}"

    def _apply(self, fn, recurse: bool = True):  # noqa: ARG002 - the state has no submodules
        """Follow the model to another device, never to another dtype (`model.half()` keeps the state exact)."""
        current = next((t.device for t in self._buffers.values() if t is not None and not t.is_meta), torch.device("cpu"))
        device = fn(torch.empty(0, device=current)).device
        for name, value in self._buffers.items():
            if value is not None and not value.is_meta:  # bases held by another rank stay shapes only
                self._buffers[name] = value.to(device)
        self._subspace = self._branch = None
        return self

    def bind(self, module: LoraLayer, principal_solver: str, principal_side: str = "right") -> None:
        """Remember where the principal basis comes from, to recompute it once only the complement is stored."""
        self._origin = (weakref.ref(module), principal_solver, principal_side)

    # -- finished tasks --------------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[FinishedTask]:
        """Every finished task's update, oldest first (views into the stacked buffers)."""
        out, start = [], 0
        for rank, scaling in zip(self._task_ranks, self._task_scalings):
            out.append(FinishedTask(self.finished_A[start : start + rank], self.finished_B[:, start : start + rank], scaling))
            start += rank
        return out

    @tasks.setter
    def tasks(self, tasks: list[FinishedTask]) -> None:
        tasks = list(tasks)
        self._task_ranks = [t.lora_A.shape[0] for t in tasks]
        self._task_scalings = [float(t.scaling) for t in tasks]
        if tasks:
            self.finished_A = torch.cat([t.lora_A.to(TASK_DTYPE) for t in tasks]).contiguous()
            self.finished_B = torch.cat([t.lora_B.to(device=tasks[0].lora_A.device, dtype=TASK_DTYPE) for t in tasks], 1)
        else:
            self.finished_A = self.finished_B = None
        self.merged_tasks = min(getattr(self, "merged_tasks", 0), len(tasks))
        self._branch = None

    def add_task(self, task: FinishedTask) -> None:
        """Append a finished task (kept unmerged; `merge_into_base_` folds it into the weight)."""
        self.tasks = [*self.tasks, task]

    @property
    def branched_tasks(self) -> int:
        """How many finished tasks act through the frozen branch rather than through the base weight."""
        return len(self._task_ranks) - self.merged_tasks

    def merge_into_base_(self, module: LoraLayer, *, together: bool = False) -> None:
        """Add the unmerged tasks into the base weight: one by one, as `end_task` and loading do (so both give the
        same bits), or `together`, summed in float32 and rounded once (`merge_and_unload`)."""
        if not self.branched_tasks:
            return
        if is_quantized(module):
            raise ValueError(
                f"cannot merge finished tasks into the quantized weight of {type(module.get_base_layer()).__name__}: "
                "keep them as a branch (finished_tasks='branch'), or export a plain LoRA with export_lora"
            )
        pending = self.tasks[self.merged_tasks :]
        with torch.no_grad():
            for delta in [merged_delta(pending)] if together else [task.delta() for task in pending]:
                apply_delta_(module.get_base_layer().weight, delta)
        self.merged_tasks = len(self._task_ranks)
        self._branch = None

    def add_branch(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output + sum_t s_t B_t A_t x` over the unmerged tasks (`FrozenBranch`); `output` when every task is merged."""
        if not self.branched_tasks:
            return output
        if self._branch is None:
            start = sum(self._task_ranks[: self.merged_tasks])
            ranks, scalings = self._task_ranks[self.merged_tasks :], self._task_scalings[self.merged_tasks :]
            self._branch = FrozenBranch(self.finished_A[start:], self.finished_B[:, start:], ranks, scalings)
        return self._branch(x, output)

    # -- held here, or by another rank ----------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this process holds the protected bases (False on the ranks that do not own a layer whose state is
        sharded by layer)."""
        return not any(self._buffers[name] is not None and self._buffers[name].is_meta for name in BASIS_BUFFERS)

    def layout(self) -> Layout:
        """Shape and dtype of each basis buffer: what the other ranks need to stand in for bases they do not hold."""
        return {name: None if (t := self._buffers[name]) is None else (tuple(t.shape), t.dtype) for name in BASIS_BUFFERS}

    def release_bases_(self, layout: Layout | None = None) -> None:
        """Keep only the shapes and dtypes of the bases (of `layout`, by default its own): another rank holds them."""
        for name, spec in (self.layout() if layout is None else layout).items():
            self._buffers[name] = None if spec is None else torch.empty(spec[0], dtype=spec[1], device="meta")
        self._subspace = None

    def _require_held(self) -> None:
        if not self.initialised:
            raise RuntimeError("the principal basis has not been computed yet: call begin_task first")
        if not self.held:
            raise RuntimeError(
                "this rank does not hold the protected bases of this layer: in a fully sharded run (FSDP2, ZeRO-3) the "
                "KeepLoRA state is sharded by layer across the ranks. keeplora_hf.protected_basis(model, name), called "
                "on every rank, fetches them from their owner"
            )

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
        self._set_basis("_principal", value, "its principal basis is fixed")

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
        self._set_basis("_memory", value, "its memory is derived")

    def _set_basis(self, name: str, value: torch.Tensor | None, fixed: str) -> None:
        """Replace a stored basis (`_principal` or `_memory`), refused once the state stores the complement instead."""
        if self.complement is not None:
            raise RuntimeError(f"this state stores the complement of its protected subspace; {fixed}")
        setattr(self, name, value)
        self._subspace = None

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
        complement is stored, the basis of its orthogonal complement (the same subspace, with no recomputation).

        Bases stored in 16 bits are not orthonormal to their own precision: they are re-orthonormalised in float32
        (QR, so the principal columns stay first), which gives exactly the subspace every projection uses.
        """
        self._require_held()
        if self.complement is not None and self._principal is None:
            basis = orthogonal_complement(self.complement.to(WORK_DTYPE))
            return basis.to(self.complement.dtype) if self.complement.dtype in EXACT_DTYPES else basis
        if self.complement is not None:
            basis = torch.cat([self._principal, self.memory.to(self._principal.dtype)], dim=1)
        elif self._memory is None or self._memory.shape[1] == 0:
            basis = self._principal
        else:
            basis = torch.cat([self._principal, self._memory.to(self._principal.dtype)], dim=1)
        return basis if basis.dtype in EXACT_DTYPES else orthonormalize(basis.to(WORK_DTYPE))

    def subspace(self) -> Subspace:
        """The protected subspace for computing (float32), by whichever basis the state stores; cached."""
        self._require_held()
        if self._subspace is None:
            # low-precision bases are re-orthonormalised in float32 (by `protected` or Subspace), so projections are
            # exact for them
            stored, complement = (self.complement, True) if self.complement is not None else (self.protected(), False)
            if stored.dtype == torch.float64:
                stored = stored.to(WORK_DTYPE)
            self._subspace = Subspace(stored, complement=complement)
        return self._subspace

    def _recomputed_principal(self) -> torch.Tensor:
        """The principal basis of the original weight (base weight minus merged tasks), inside the protected subspace."""
        solver, side = self._origin[1:] if self._origin is not None else ("svd", "right")
        basis, energies = principal_basis(self.original_weight(), 1.0, solver=solver, side=side, return_energies=True,
                                          rank=self.principal_rank)
        expected = self.principal_energies
        if basis.shape[1] != self.principal_rank or (
            expected is not None
            and expected.numel()
            and float((energies - expected.to(energies)).abs().max()) > 1e-3 * float(expected.max())  # as hub/load.py
        ):
            raise RuntimeError(
                f"the principal basis recomputed from this layer's original weight (p={basis.shape[1]}) does not match "
                f"the stored one (p={self.principal_rank}): the base weights are not those the state was built on"
            )
        # rounding in (base + tasks) - tasks moves it by ~1e-7: put it back inside the protected subspace
        complement = Subspace(self.complement.to(torch.float64), complement=True)
        basis = orthonormalize(complement.project_onto(basis.T.to(torch.float64)).T)
        return basis.to(self.complement.dtype)

    def original_weight(self, module: LoraLayer | None = None) -> torch.Tensor:
        """The layer's pre-trained weight in float32: its base weight minus the tasks merged into it (`module`: the
        layer, by default the one the state is bound to)."""
        module = module if module is not None else self._origin[0]() if self._origin is not None else None
        if module is None:
            raise RuntimeError(
                "this layer state stores the complement of its protected subspace and is not attached to its layer, so "
                "its principal basis cannot be recomputed"
            )
        original = base_weight(module).float().clone()
        if self.merged_tasks:
            original -= merged_delta(self.tasks[: self.merged_tasks]).to(original.device)
        return original

    # -- how it changes ----------------------------------------------------------------------------------------

    def add_memory(
        self, new: torch.Tensor, dtype: torch.dtype, *, keep_principal: bool = True, remaining: torch.Tensor | None = None
    ) -> None:
        """Append orthonormal directions (`d_in x n`, orthogonal to what is protected) to the memory, in `dtype`.

        Switches to storing the complement once that is the narrower basis: of the memory (`keep_principal`), or of
        the whole protected subspace (the principal basis is then dropped, also by a state that kept it so far, and
        recomputed when asked for). `remaining`: where the memory solve gave it (`MemoryGrowth`), the complement of the
        protected subspace with `new` added, taken as the complement when one is stored.
        """
        self._require_held()
        self._subspace = None
        if self.complement is not None:
            if remaining is not None:
                self.complement = remaining.to(dtype)
            elif new.shape[1]:
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
            if remaining is None:
                basis = torch.cat([self._principal.to(torch.float64), memory.to(torch.float64)], dim=1)
                remaining = orthogonal_complement(basis)
            self.complement = remaining.to(dtype)
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
        self.measure_principal_energies_()
        self._principal = None

    def measure_principal_energies_(self, module: LoraLayer | None = None) -> None:
        """Measure the energies of the stored principal basis on the original weight if the state lacks them (a
        state saved with its basis keeps no energies); `module`: as for `original_weight`."""
        if self.principal_energies is None and self._principal is not None:
            weight = principal_source(self.original_weight(module), self._origin[2] if self._origin else "right")
            self.principal_energies = ritz_energies(weight, self._principal)

    def cast_(self, dtype: torch.dtype) -> None:
        """Store the bases in `dtype` (in place)."""
        for name in ("_principal", "_memory", "complement"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(dtype))
        self._subspace = None
