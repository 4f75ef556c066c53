"""The KeepLoRA continual state on disk: its flat `*.keeplora_state.*` tensors, their checksum, and the checks that
install a saved state only onto the base model and the layers it was learned on."""

from __future__ import annotations

import hashlib
import os
import re

import torch
from peft import PeftConfig
from peft.tuners.lora import LoraLayer

from ..process_group import rank_and_world
from .layer import layer_state, set_layer_state
from .finished import FinishedTask
from .state import KeepLoRALayerState
from .state_sharding import Owners, from_owner, owns
from .weights import FINGERPRINT_TOLERANCE, apply_delta_, fingerprint_gap, is_quantized

STATE_KEY = "keeplora_state"


class TaskProgress:
    """Where an adapter stands in its task sequence: finished tasks, and whether a task is under way."""

    def __init__(self, task_index: int = 0, in_task: bool = False) -> None:
        self.task_index = task_index
        self.in_task = in_task



def state_tensors(
    layers: dict[str, LoraLayer], adapter_name: str, progress: TaskProgress, owners: Owners | None = None
) -> dict[str, torch.Tensor]:
    """Flat tensors of the whole continual state, keyed `<layer>.keeplora_state.<field>`, with their checksum.

    With `owners` (the state sharded by layer) every rank must call it: each basis comes from its owner, one tensor at
    a time, and only global rank 0, the writer, keeps the ones it does not own (the other ranks' dicts are partial).
    """
    writer = rank_and_world()[0] == 0
    tensors = {
        f"{STATE_KEY}.task_index": torch.tensor([progress.task_index], dtype=torch.int64),
        f"{STATE_KEY}.in_task": torch.tensor([int(progress.in_task)], dtype=torch.int64),
    }
    for name, module in layers.items():
        state = layer_state(module, adapter_name)
        prefix = f"{name}.{STATE_KEY}"
        for field, value in _basis_fields(state).items():
            if owners is not None:
                held = value if owns(owners, name) else None
                device = module.get_base_layer().weight.device
                value = from_owner(held, tuple(value.shape), value.dtype, device, owners[name])
                if not (writer or owns(owners, name)):
                    continue
            tensors[f"{prefix}.{field}"] = value.detach().cpu().contiguous()
        tensors[f"{prefix}.merged_tasks"] = torch.tensor([state.merged_tasks], dtype=torch.int64)
        for field in ("fingerprint", "task_probe"):
            if getattr(state, field) is not None:
                tensors[f"{prefix}.{field}"] = getattr(state, field).detach().cpu().contiguous()
        for t, task in enumerate(state.tasks):
            tensors[f"{prefix}.task{t}.lora_A"] = task.lora_A.detach().cpu().contiguous()
            tensors[f"{prefix}.task{t}.lora_B"] = task.lora_B.detach().cpu().contiguous()
            tensors[f"{prefix}.task{t}.scaling"] = torch.tensor([task.scaling], dtype=torch.float64)
    tensors[f"{STATE_KEY}.checksum"] = state_checksum(tensors)
    return tensors


def _basis_fields(state: KeepLoRALayerState) -> dict[str, torch.Tensor]:
    """The saved fields of the layout held in memory (see KeepLoRALayerState); `meta` stand-ins on a rank that does not
    own the layer. `principal` is the (d_in, p) basis, or, when the state keeps only the complement of its protected
    subspace, the (p,) energies that identify it."""
    fields = {}
    if state.stored_principal is not None:
        fields["principal"] = state.stored_principal
    elif state.complement is not None:
        fields["principal"] = state.principal_energies.to(torch.float64)
    if state.complement is not None:
        fields["complement"] = state.complement
    elif state.memory is not None:
        fields["memory"] = state.memory
    return fields


def state_checksum(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 of every KeepLoRA state tensor among `tensors` (key, dtype, shape and bytes, in key order), as 32
    uint8 values."""
    digest = hashlib.sha256()
    for key in sorted(k for k in tensors if STATE_KEY in k and not k.endswith(f"{STATE_KEY}.checksum")):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8).clone()


def trust_base() -> bool:
    """`KEEPLORA_TRUST_BASE=1` loads an adapter onto a base whose weights do not match the ones it was trained on."""
    return os.environ.get("KEEPLORA_TRUST_BASE", "") not in ("", "0", "false", "False")


_LAYER_KEY = re.compile(rf"^(?P<layer>.+)\.{STATE_KEY}\.(?P<field>principal|memory|complement|merged_tasks|fingerprint|task_probe|task(?P<task>\d+)\.(?P<part>lora_A|lora_B|scaling))$")


_TASK_FIELD = re.compile(r"task(\d+)\.")  # a finished task's field: task<t>.lora_A / lora_B / scaling


def install_state(
    layers: dict[str, LoraLayer], adapter_name: str, config: PeftConfig, tensors: dict[str, torch.Tensor]
) -> TaskProgress:
    """Check a saved continual state against `layers` and install it, merging the tasks it says are merged.

    Everything is checked (checksum, base-weight fingerprints, shapes, history) before anything is changed, so a
    refused state leaves the model as it was. Returns the adapter's progress.
    """
    if not tensors:
        raise ValueError(
            "the saved adapter holds no KeepLoRA state (no keeplora_state entries): it was stripped or is not a KEEPLORA "
            "adapter; loading it would give the untrained base with task index 0"
        )
    checksum = next((v for k, v in tensors.items() if k.endswith(f"{STATE_KEY}.checksum")), None)
    if checksum is not None and not torch.equal(checksum.cpu(), state_checksum(tensors)):
        raise ValueError(
            "the saved KeepLoRA state fails its checksum: the adapter file was modified or corrupted after it was "
            "written (a flipped byte, an edited task_index, removed entries); load an intact copy"
        )
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    task_index = in_task = None
    for key, value in tensors.items():
        if key.endswith(f"{STATE_KEY}.task_index"):
            task_index = int(value.item())
            continue
        if key.endswith(f"{STATE_KEY}.in_task"):
            in_task = bool(value.item())
            continue
        if key.endswith(f"{STATE_KEY}.checksum"):
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ValueError(f"unrecognised KeepLoRA state entry {key!r} in the saved adapter")
        by_layer.setdefault(match["layer"], {})[key[len(match["layer"]) + len(STATE_KEY) + 2 :]] = value
    if task_index is None or in_task is None:
        raise ValueError("the saved adapter's KeepLoRA state lacks task_index / in_task: the file is incomplete")

    unknown = sorted(set(by_layer) - set(layers))
    if unknown:
        raise ValueError(f"the saved KeepLoRA state names layers this model lacks: {unknown[:5]}")
    new_states = {name: _parse_layer_state(name, m, by_layer.get(name, {}), task_index) for name, m in layers.items()}
    for name, module in layers.items():
        current = layer_state(module, adapter_name)
        saved = new_states[name].fingerprint
        if saved is not None and not trust_base():
            gap = fingerprint_gap(saved, current.original_weight(module))
            if gap > FINGERPRINT_TOLERANCE:
                raise ValueError(
                    f"the base model is not the one this adapter was trained on: the pre-trained weight of {name} "
                    f"differs from the saved fingerprint by {gap:.2g} of its norm (a dtype cast of the same weights "
                    f"stays below {FINGERPRINT_TOLERANCE}). Load it onto the same base model, or set "
                    "KEEPLORA_TRUST_BASE=1 to load anyway"
                )
        held = current.tasks
        if held and not _same_history(held, new_states[name].tasks[: len(held)]):
            raise ValueError(
                f"{name} already holds KeepLoRA tasks that differ from the saved ones; load the adapter into a fresh "
                "base model"
            )
        if current.merged_tasks > new_states[name].merged_tasks:
            raise ValueError(
                f"{name} has {current.merged_tasks} tasks merged into its weight, the saved state only "
                f"{new_states[name].merged_tasks}; load the adapter into a fresh base model"
            )
        if new_states[name].merged_tasks > current.merged_tasks and is_quantized(module):
            raise ValueError(f"the saved state of {name} has tasks merged into a weight that is quantized in this model")

    for name, module in layers.items():
        state = new_states[name]
        already = layer_state(module, adapter_name).merged_tasks  # e.g. a Trainer resuming inside the next task
        with torch.no_grad():  # task by task, as end_task merged them, so the weights get the same bits
            for task in state.tasks[already : state.merged_tasks]:
                apply_delta_(module.get_base_layer().weight, task.delta())
        state.bind(module, config.principal_solver, config.principal_side)
        state.task_open = in_task
        set_layer_state(module, adapter_name, state)
    return TaskProgress(task_index, in_task)


def _same_history(merged: list[FinishedTask], saved: list[FinishedTask]) -> bool:
    return len(merged) == len(saved) and all(
        torch.equal(a.lora_A.cpu(), b.lora_A) and torch.equal(a.lora_B.cpu(), b.lora_B) and a.scaling == b.scaling
        for a, b in zip(merged, saved)
    )


def _parse_layer_state(name: str, module: LoraLayer, fields: dict[str, torch.Tensor], task_index: int) -> KeepLoRALayerState:
    base = module.get_base_layer()
    d_in, d_out = base.in_features, base.out_features
    # `principal` is the (d_in, p) basis, or, next to a `complement`, the (p,) energies that identify it
    complemented = "complement" in fields
    for key in ("principal", "memory", "complement"):
        basis = fields.get(key)
        if basis is None or (key == "principal" and complemented and basis.ndim == 1):
            continue
        if basis.ndim != 2 or basis.shape[0] != d_in:
            raise ValueError(
                f"saved KeepLoRA {key} basis of {name} has shape {tuple(basis.shape)}, but the layer has d_in={d_in}: "
                "the adapter was saved from a different base model"
            )
    if "memory" in fields and complemented:
        raise ValueError(f"saved KeepLoRA state of {name} holds both a memory and a complement basis; the file is corrupt")
    if ("memory" in fields or complemented) and "principal" not in fields:
        raise ValueError(f"saved KeepLoRA state of {name} has a memory but no principal basis; the file is corrupt")
    energies_only = complemented and fields["principal"].ndim == 1
    if "principal" in fields:
        p = fields["principal"].numel() if energies_only else fields["principal"].shape[1]
        columns = p + sum(fields[k].shape[1] for k in ("memory", "complement") if k in fields)
        if columns > d_in:
            raise ValueError(
                f"saved KeepLoRA bases of {name} have {columns} columns in total, more than d_in={d_in}; the file is corrupt"
            )
    if energies_only:
        state = KeepLoRALayerState(complement=fields["complement"], principal_energies=fields["principal"].to(torch.float64))
    else:
        state = KeepLoRALayerState(fields.get("principal"), fields.get("memory"), complement=fields.get("complement"))
    tasks = []
    for t in range(task_index):
        try:
            lora_a, lora_b = fields[f"task{t}.lora_A"], fields[f"task{t}.lora_B"]
            scaling = float(fields[f"task{t}.scaling"].item())
        except KeyError as missing:
            raise ValueError(f"saved KeepLoRA state of {name} lacks {missing} for finished task {t}") from None
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[1] != d_in or lora_b.shape[0] != d_out or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(
                f"saved task {t} of {name} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}, which "
                f"do not fit a ({d_out}, {d_in}) weight: the adapter was saved from a different base model"
            )
        tasks.append(FinishedTask(lora_a.float(), lora_b.float(), scaling))
    state.tasks = tasks
    # adapters saved before finished tasks could stay unmerged have every task merged
    merged = int(fields["merged_tasks"].item()) if "merged_tasks" in fields else task_index
    if not 0 <= merged <= task_index:
        raise ValueError(f"saved KeepLoRA state of {name} has {merged} merged tasks out of {task_index}; the file is corrupt")
    state.merged_tasks = merged
    state.fingerprint = fields.get("fingerprint")
    state.task_probe = fields.get("task_probe")
    beyond = sorted(k for k in fields if (task := _TASK_FIELD.match(k)) and int(task[1]) >= task_index)
    if beyond:
        raise ValueError(
            f"saved KeepLoRA state of {name} holds {beyond[0]} but task_index says only {task_index} tasks are finished; "
            "the file is corrupt"
        )
    if task_index > 0 and not state.initialised:
        raise ValueError(f"saved KeepLoRA state of {name} lacks its principal basis after {task_index} tasks")
    return state
