"""The KeepLoRA state sharded by layer across the ranks of a fully sharded run (FSDP2, DeepSpeed ZeRO-3).

Replicated, the protected bases would put a floor under each rank's memory that sharding the weights cannot lower
(`(W/2 + S) / (W + S)` of one process, see docs/parallel.md). So when the base is fully sharded, each layer's bases live on
one rank, its owner (layers dealt out in module order to the rank with the fewest `d_in^2` so far): the owner derives
the layer's `A` and grows its memory from statistics that every rank has summed, then sends `A` to the others. The
other ranks keep the bases' shapes and dtypes only (`meta` tensors, see `KeepLoRALayerState.held`). Finished tasks
stay on every rank: the frozen branch and merges need them. A save fetches the bases from their owners one tensor at
a time (the writer keeps them on the CPU); a load installs the whole state, and the next `begin_task` / `end_task` /
training start releases what this rank does not own.

DDP, ZeRO-1/2 and `device_map` replicate or place the whole model, and keep the whole state on every process.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import nn

from ..process_group import rank_and_world
from ..sharding import full_value, is_fully_sharded, is_sharded
from .layer import layer_state
from .state import KeepLoRALayerState, Layout

Owners = dict[str, int]


def state_owners(model: nn.Module, layers: Mapping[str, LoraLayer]) -> Owners | None:
    """Each target's owning rank when `model`'s base is fully sharded over several ranks; None when every process
    keeps the whole state. The same on every rank."""
    _, world = rank_and_world()
    if world == 1 or not is_fully_sharded(getattr(model, "module", model)):
        return None
    return balanced_owners(layers, world)


def balanced_owners(layers: Mapping[str, LoraLayer], world: int) -> Owners:
    """Deal the layers out in order, each to the rank with the least `d_in^2` so far (ties: the lowest rank): the
    bases of a layer hold at most `d_in^2` values, and its SVDs cost in proportion."""
    load = [0] * world
    owners = {}
    for name, module in layers.items():
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += module.get_base_layer().in_features ** 2
    return owners


def owns(owners: Owners | None, name: str) -> bool:
    """Whether this rank computes and holds `name`'s bases (always, when the state is not sharded)."""
    return owners is None or owners[name] == rank_and_world()[0]


def from_owner(value: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, owner: int) -> torch.Tensor:
    """The owner's `value` on every rank, bit for bit (a broadcast of its bytes, so any dtype travels); the other
    ranks pass None and the `shape` and `dtype` it has. A collective: every rank calls it, in the same order."""
    if value is not None:
        buffer = value.detach().to(device=device, dtype=dtype).contiguous()  # a broadcast only reads its source
    else:
        buffer = torch.empty(shape, dtype=dtype, device=device)
    if buffer.numel():
        dist.broadcast(buffer.reshape(-1).view(torch.uint8), src=owner)
    return buffer


def release_unowned_(layers: Mapping[str, LoraLayer], adapter: str, owners: Owners | None) -> None:
    """Drop the bases this rank holds but does not own (a state loaded whole). A state loaded whole may lack the
    principal energies that its owner needs to drop the principal basis later: the owner measures them now, on the
    whole original weight, which every rank that holds the state helps gather."""
    if owners is None:
        return
    for name, module in layers.items():
        state = layer_state(module, adapter)
        if not (state.initialised and state.held):
            continue
        if state.principal_energies is None and state.stored_principal is not None:
            if owns(owners, name):
                state.measure_principal_energies_(module)
            else:
                join_weight_gather(module)
        if not owns(owners, name):
            state.release_bases_()


def join_weight_gather(module: LoraLayer) -> None:
    """Take this rank's part in gathering `module`'s whole base weight, which its owner reads (a collective when the
    weight is sharded; nothing to do otherwise)."""
    weight = module.get_base_layer().weight
    if is_sharded(weight):
        full_value(weight)


def complete_from_owners(states: dict[str, KeepLoRALayerState | None], owners: Owners | None) -> dict[str, KeepLoRALayerState]:
    """`states` with each None (a layer this rank does not own) replaced by a stand-in built from its owner's layout
    and fingerprint. Every rank passes the same names (a collective when the state is sharded)."""
    if owners is None or not states:
        return states  # type: ignore[return-value]
    shared = _owned_layouts({name: state for name, state in states.items() if state is not None})
    completed = {}
    for name, state in states.items():
        if state is None:
            layout, fingerprint = shared[name]
            state = KeepLoRALayerState()
            state.release_bases_(layout)
            state.fingerprint = fingerprint
        completed[name] = state
    return completed


def adopt_owners_layouts_(layers: Mapping[str, LoraLayer], adapter: str, owners: Owners | None) -> None:
    """After the owners changed their bases (a task's end): every other rank takes the new shapes. A collective when
    the state is sharded."""
    if owners is None:
        return
    states = {name: layer_state(module, adapter) for name, module in layers.items()}
    shared = _owned_layouts({name: state for name, state in states.items() if owns(owners, name)})
    for name, state in states.items():
        if not owns(owners, name):
            state.release_bases_(shared[name][0])


def _owned_layouts(owned: dict[str, KeepLoRALayerState]) -> dict[str, tuple[Layout, torch.Tensor | None]]:
    """Every rank's `(layout, fingerprint)` of the layers it owns, on every rank."""
    mine = {
        name: (state.layout(), None if state.fingerprint is None else state.fingerprint.detach().cpu())
        for name, state in owned.items()
    }
    _, world = rank_and_world()
    gathered: list[dict | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {name: entry for part in gathered for name, entry in (part or {}).items()}
