"""KeepLoRA++cls: one cosine classifier per task, its logits added to a CLIP model's zero-shot logits of that task.

The reference (KeepLoRA v2, MTIL configs `keeplora_cls_order*.yaml`, `classifier: 'CosineClassifier'`) gives each task
a head `30 * cos(f, w_c)` over the normalised image features `f`, its weights `w_c` initialised from the task's
normalised class means of `f` (taken before the task trains), trained with the task's LoRA, and frozen afterwards; a
task is evaluated with its own head when it has one, zero-shot otherwise. Here the heads are a submodule of the CLIP
model (`keeplora_heads`), so a Trainer built after `add_task_head` trains the new head; a forward hook adds the
active head's logits to `logits_per_image` (and `logits_per_text`); they are saved in the adapter's weights file with
the KeepLoRA state (`head_tensors` / `install_heads`), and beside an export (`save_task_heads` / `load_task_heads`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .statistics import move_to

HEADS_ATTR = "keeplora_heads"  # the submodule of the CLIP model that holds the heads
HEADS_KEY = "keeplora_heads"  # the prefix of their tensors in an adapter or export file
HEADS_FILE = "keeplora_heads.safetensors"  # the heads beside an export
DEFAULT_SCALE = 30.0  # the reference CosineClassifier's scale

__all__ = [
    "HEADS_FILE", "CosineHead", "TaskHeads", "add_task_head", "class_mean_weight", "load_task_heads", "save_task_heads",
    "task_head", "task_heads",
]


class CosineHead(nn.Module):
    """`scale * normalize(f) @ normalize(weight)^T`: a task's classifier over image features `f`, weight `C x D`
    kept in float32 (as LoRA's factors are) and applied in float32, whatever the base dtype."""

    def __init__(self, weight: torch.Tensor, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.scale = float(scale)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = F.normalize(features.to(self.weight), dim=-1)
        return self.scale * features @ F.normalize(self.weight, dim=-1).T


class TaskHeads(nn.Module):
    """The heads of a task sequence, in task order, and the task whose head the forward applies (`active`)."""

    def __init__(self, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        self.heads = nn.ModuleList()
        self.tasks: list[str] = []
        self.scale = float(scale)
        self.active: str | None = None

    def head(self, task: str) -> CosineHead | None:
        return self.heads[self.tasks.index(task)] if task in self.tasks else None

    def add(self, task: str, weight: torch.Tensor) -> CosineHead:
        """A trainable head for `task` from `weight` (`C x D`); every earlier head is frozen, as the reference's."""
        if task in self.tasks:
            raise ValueError(f"task {task!r} already has a classifier head")
        for head in self.heads:
            head.weight.requires_grad_(False)
        head = CosineHead(weight, self.scale)
        self.heads.append(head)
        self.tasks.append(task)
        return head

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, scale={self.scale:g}, active={self.active!r}"


def task_heads(model: nn.Module) -> TaskHeads | None:
    """The heads of `model` (a CLIP model, or a PeftModel around one), or None when it has none."""
    heads = _clip_model(model)._modules.get(HEADS_ATTR)
    return heads if isinstance(heads, TaskHeads) else None


def attach_task_heads(model: nn.Module, scale: float = DEFAULT_SCALE) -> TaskHeads:
    """The model's heads, made (empty, with the forward hook that applies them) on first use."""
    heads = task_heads(model)
    if heads is None:
        clip = _clip_model(model)
        heads = TaskHeads(scale)
        clip.add_module(HEADS_ATTR, heads)
        clip.register_forward_hook(_add_head_logits)
    elif heads.scale != float(scale):
        raise ValueError(f"the model's classifier heads have scale {heads.scale:g}, not {scale:g}")
    return heads


def _clip_model(model: nn.Module) -> nn.Module:
    """The CLIP model inside `model`: itself, or the base model of a PeftModel (possibly wrapped by DDP)."""
    model = getattr(model, "module", model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "get_image_features"):
        raise TypeError(f"classifier heads need a CLIP-style model (image and text towers), got {type(inner).__name__}")
    return inner


def _add_head_logits(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: `logits_per_image += head(image_embeds)` for the active task's head (none: zero-shot)."""
    heads = module._modules.get(HEADS_ATTR)
    head = heads.head(heads.active) if heads is not None and heads.active is not None else None
    if head is None:
        return output
    logits = getattr(output, "logits_per_image", None)
    if logits is None or getattr(output, "image_embeds", None) is None:
        raise ValueError("classifier heads need the model's output with logits_per_image and image_embeds (a dict)")
    if logits.shape[-1] != head.num_classes:
        raise ValueError(
            f"task {heads.active!r}: its classifier head has {head.num_classes} classes (the rows of its weight) but "
            f"the model scored {logits.shape[-1]} class prompts: the batch holds another task's prompts, or the head "
            "was learned with another class list"
        )
    output.logits_per_image = logits + head(output.image_embeds).to(logits.dtype)
    output.logits_per_text = output.logits_per_image.T
    return output


@contextlib.contextmanager
def task_head(model: nn.Module, task: str | None) -> Iterator[None]:
    """Apply `task`'s head (none, or a task without one: zero-shot logits) inside the block, as the reference
    evaluates each task; the previous choice is restored after it."""
    heads = task_heads(model)
    if heads is None:
        yield
        return
    previous, heads.active = heads.active, task
    try:
        yield
    finally:
        heads.active = previous


@torch.no_grad()
def class_mean_weight(model: nn.Module, batches: Iterable[Mapping[str, Any]], task: str) -> torch.Tensor:
    """Each class's mean of the normalised image features (`image_embeds`), normalised: the reference's initial head.

    `batches` hold the task's class prompts and `labels` (as `ClipCollator` makes them); the model runs without any
    head. Every class needs at least one image.
    """
    parameter = next(model.parameters())
    sums = counts = None
    was_training = model.training
    model.eval()
    try:
        with task_head(model, None):
            for batch in batches:
                inputs = move_to(dict(batch), parameter.device)
                labels = inputs.pop("labels")
                output = model(**inputs)
                features = F.normalize(output.image_embeds.float(), dim=-1)
                if sums is None:
                    sums = features.new_zeros(output.logits_per_image.shape[-1], features.shape[-1])
                    counts = features.new_zeros(sums.shape[0])
                sums.index_add_(0, labels, features)
                counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
    finally:
        model.train(was_training)
    if sums is None:
        raise ValueError(f"task {task!r}: no batch to initialise its classifier head from")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"task {task!r}: classes {empty[:10]} have no training image, so their head weights cannot be initialised "
            "from class means"
        )
    return F.normalize(sums / counts[:, None], dim=-1)


def add_task_head(
    model: nn.Module, task: str, batches: Iterable[Mapping[str, Any]], *, scale: float = DEFAULT_SCALE,
    activate: bool = True,
) -> CosineHead:
    """Give `task` a trainable head initialised from its class means (earlier heads frozen), active unless
    `activate=False` (a Trainer's callback then activates it after `begin_task`, whose gradient the reference takes
    without the new head). Call it before the task's optimizer is built."""
    heads = attach_task_heads(model, scale)
    head = heads.add(task, class_mean_weight(model, batches, task))
    heads.active = task if activate else None  # not the previous task's head: its classes are not this task's
    return head


# -- on disk ----------------------------------------------------------------------------------------------------


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The heads as flat tensors (`keeplora_heads.scale`, `.task<i>.weight`, `.task<i>.name` as UTF-8 bytes)."""
    heads = task_heads(model)
    if heads is None or not heads.tasks:
        return {}
    tensors = {f"{HEADS_KEY}.scale": torch.tensor([heads.scale], dtype=torch.float64)}
    for index, (task, head) in enumerate(zip(heads.tasks, heads.heads)):
        tensors[f"{HEADS_KEY}.task{index}.weight"] = head.weight.detach().cpu().contiguous()
        tensors[f"{HEADS_KEY}.task{index}.name"] = torch.tensor(list(task.encode("utf-8")), dtype=torch.uint8)
    return tensors


def install_heads(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, *, trainable: int | None = None
) -> None:
    """Check saved heads (`head_tensors`) against `model` and install them, every one frozen but head `trainable`.

    A head the model has already, of the same task and shape, is overwritten in place (a Trainer resuming the task
    keeps its optimizer's parameter); the model's heads end up exactly the saved ones. Everything is checked first,
    naming `source`, the task and the field: a refused file changes nothing.
    """
    saved = _parse(tensors, source)
    scale = float(tensors[f"{HEADS_KEY}.scale"].item())
    features = _feature_width(model)
    for index, (task, weight) in enumerate(saved):
        if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] != features or not weight.is_floating_point():
            raise ValueError(
                f"{source}: the classifier head of task {task!r} ({HEADS_KEY}.task{index}.weight) has shape "
                f"{list(weight.shape)} ({weight.dtype}); it must be (classes, {features}) floats, the width of this "
                "model's image features"
            )
    heads = attach_task_heads(model, scale)
    device = _clip_model(model).logit_scale.device
    kept = []
    for index, (task, weight) in enumerate(saved):
        current = heads.heads[index] if index < len(heads.tasks) and heads.tasks[index] == task else None
        if current is not None and current.weight.shape == weight.shape:
            with torch.no_grad():
                current.weight.copy_(weight)
        else:
            current = CosineHead(weight, scale).to(device)
        current.weight.requires_grad_(index == trainable)
        kept.append(current)
    heads.heads = nn.ModuleList(kept)
    heads.tasks = [task for task, _ in saved]


def _parse(tensors: Mapping[str, torch.Tensor], source: str) -> list[tuple[str, torch.Tensor]]:
    """The saved (task, weight) pairs in task order, refused when a field is missing or malformed."""
    if f"{HEADS_KEY}.scale" not in tensors:
        raise ValueError(f"{source}: the classifier heads have no {HEADS_KEY}.scale entry: the file is not complete")
    indices = set()
    for key in tensors:
        field = key[len(HEADS_KEY) + 1 :]
        if field == "scale":
            continue
        number, _, part = field.partition(".")
        if not (number.startswith("task") and number[4:].isdigit() and part in ("weight", "name")):
            raise ValueError(f"{source}: unknown classifier-head entry {key!r}")
        indices.add(int(number[4:]))
    pairs = []
    for index in range(len(indices)):
        name, weight = tensors.get(f"{HEADS_KEY}.task{index}.name"), tensors.get(f"{HEADS_KEY}.task{index}.weight")
        if index not in indices or name is None or weight is None:
            missing = "name" if weight is not None else "weight"
            raise ValueError(f"{source}: the classifier head of task {index} has no {HEADS_KEY}.task{index}.{missing}")
        try:
            task = bytes(name.to(torch.uint8).tolist()).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{source}: {HEADS_KEY}.task{index}.name is not a UTF-8 task name") from None
        pairs.append((task, weight))
    tasks = [task for task, _ in pairs]
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise ValueError(f"{source}: tasks {repeated} have more than one classifier head")
    return pairs


def _feature_width(model: nn.Module) -> int:
    clip = _clip_model(model)
    return int(getattr(clip.config, "projection_dim", 0) or clip.visual_projection.out_features)


def save_task_heads(model: nn.Module, directory: str | os.PathLike) -> Path | None:
    """Write the model's heads to `directory/keeplora_heads.safetensors` (none: nothing written, None returned)."""
    tensors = head_tensors(model)
    if not tensors:
        return None
    path = Path(directory) / HEADS_FILE
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_task_heads(
    model: nn.Module, directory: str | os.PathLike, expected: Mapping[str, int] | None = None
) -> TaskHeads:
    """Attach the heads saved beside an export (`directory/keeplora_heads.safetensors`) to a CLIP model: the merged
    checkpoint, or a base with the exported LoRA. `expected` (task -> class count) is checked when given."""
    path = Path(directory) / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the export has no classifier heads (the model was trained without them, or the file "
            "was not copied with the export)"
        )
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path} is truncated or corrupt ({error}); export the model again") from None
    install_heads(model, tensors, str(path))
    heads = task_heads(model)
    check_head_classes(heads, expected or {}, str(path))
    return heads


def check_head_classes(heads: TaskHeads | None, expected: Mapping[str, int], source: str) -> None:
    """Each task of `expected` that has a head must have as many classes as it has class prompts."""
    for task, classes in expected.items():
        head = heads.head(task) if heads is not None else None
        if head is not None and head.num_classes != classes:
            raise ValueError(
                f"{source}: the classifier head of task {task!r} has {head.num_classes} classes, but the task has "
                f"{classes} class names"
            )
