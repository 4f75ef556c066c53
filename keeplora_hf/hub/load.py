"""Rebuild a run's model (base + learned tasks + subspace state) from a run directory or a pushed repo, after
checking that the base model given is the one the run was learned on; and the plain LoRA of its first tasks."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn

from ..continual.run_dir import ADAPTER_FILES, RunInfo
from ..export import export_lora, export_merged
from ..subspace import principal_source, squared_singular_values
from ..tuner.layer import layer_state
from ..tuner.model import STATE_KEY, keeplora_layers, tuner_of
from ..tuner.weights import base_weight
from .repo import check_local_folder, hub_model_id, open_run, revision_name

logger = logging.getLogger(__name__)


def load_run(
    run_or_repo: str | os.PathLike | RunInfo,
    base_model: nn.Module | str | os.PathLike | None = None,
    *,
    after_task: int | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    is_trainable: bool = True,
) -> PeftModel:
    """Base + learned tasks + subspace state, from a run directory or a repo id, ready to learn the next task.

    `base_model` is the fresh pre-trained model the run started from (it is changed in place: the learned tasks
    are merged into its weights), or its Hub id / local path, or None for the adapter's `base_model_name_or_path`.
    Refuses a base model of another name (both Hub ids) or class than the one the adapter records, one whose weights
    the saved principal subspaces do not fit (another model of the same shapes), and one whose shapes do not fit.
    """
    info = open_run(run_or_repo, revision=revision, token=token)
    index = info.checked_task(after_task)
    if index not in info.adapters:
        raise ValueError(
            f"{info.source} keeps no adapter after task {index} ({info.tasks[index - 1]}), only after task(s) "
            f"{sorted(info.adapters)}: a pushed repo holds its last state, and earlier ones in its per-task revisions "
            f"(revision='{revision_name(info, index)}') when pushed with them"
        )
    base = _base_module(base_model, info)
    _check_base_fits(info, info.adapters[index], base)
    try:
        return PeftModel.from_pretrained(base, str(info.adapters[index]), is_trainable=is_trainable)
    except (ValueError, RuntimeError, KeyError) as error:
        raise ValueError(
            f"the KeepLoRA adapter after task {index} of {info.source} does not fit the given base model: {error}"
        ) from error



def model_at(info: RunInfo, model: PeftModel | None, base_model: Any) -> PeftModel:
    """The model at the run's last learned task: the one given, checked, or rebuilt from the base model."""
    if model is None:
        return load_run(info, base_model, is_trainable=False)
    tuner = tuner_of(model)
    progress = tuner.progress(tuner.keeplora_adapter())
    if progress.task_index != info.learned or progress.in_task:
        raise ValueError(
            f"the model given has learned {progress.task_index} task(s)"
            f"{' and is inside another' if progress.in_task else ''}, but {info.source} has learned {info.learned}: "
            "pass the model at the end of the run, or base_model="
        )
    return model


def _base_module(base_model: Any, info: RunInfo) -> nn.Module:
    recorded = info.base_model_name
    if base_model is None:
        if not recorded:
            raise ValueError(
                f"the adapter of {info.source} records no base model (it was built from a config): pass base_model=, "
                "the pre-trained model the run started from (--base-model on the command line)"
            )
        base_model = recorded
    if isinstance(base_model, (str, os.PathLike)):
        _check_base_name(recorded, str(base_model), info.source)
        return _load_base(str(base_model))
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be an nn.Module, a Hub id or a local path, got {type(base_model).__name__}")
    if isinstance(base_model, PeftModel) or any(hasattr(m, "lora_A") for m in base_model.modules()):
        raise ValueError(
            "base_model already carries adapters: pass the fresh pre-trained model (the learned tasks are merged "
            "into its weights as the run is rebuilt)"
        )
    config = getattr(base_model, "config", None)
    given = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    _check_base_name(recorded, given, info.source)
    return base_model


def _check_base_name(recorded: str | None, given: str | None, source: str) -> None:
    """Refuse a base of another name when both names are Hub ids; local paths differ across machines, so only warn."""
    if not recorded or not given or recorded == given:
        return
    if hub_model_id(recorded) and hub_model_id(given):
        raise ValueError(
            f"{source} was learned on the base model {recorded!r}, but the base model given is {given!r}: a KeepLoRA "
            "state only fits the model it was computed on"
        )
    logger.warning("%s records the base model %r; rebuilding it on %r", source, recorded, given)


def _check_base_fits(info: RunInfo, adapter: Path, base: nn.Module) -> None:
    """Refuse a base model of another class, or whose weights the saved principal subspaces do not come from.

    Shapes alone miss a different model of the same architecture and size. `base` is the pre-trained model, before
    the adapter merges its tasks: the weight `W` the principal subspaces were computed from. A layer saves either
    its principal basis `P` (`d_in x p`), right singular vectors of `W` (of `W^T` with `principal_side='left'`), so
    `(W P)^T (W P)` is diagonal for that weight and not for another one (two products); or, when it keeps only the
    complement of its protected subspace (`keep_principal_basis=False`, the default), the energies of those
    directions, `W`'s top `p` squared singular values, compared with the given weight's (one float64 Gram
    eigendecomposition). Two layers are checked; this holds whatever epsilon_w each layer was given (recipes may give some layers their own).
    """
    recorded = (info.adapter_config.get("auto_mapping") or {}).get("base_model_class")
    if recorded and recorded != type(base).__name__:
        raise ValueError(
            f"{info.source} was learned on a {recorded}, but the base model given is a {type(base).__name__}: a "
            "KeepLoRA state only fits the model it was computed on"
        )
    suffix = f".{STATE_KEY}.principal"
    side = info.adapter_config.get("principal_side", "right")
    with safe_open(str(adapter / ADAPTER_FILES[1]), framework="pt") as f:
        keys = sorted(k for k in f.keys() if k.endswith(suffix))
        for key in dict.fromkeys(keys[:1] + keys[-1:]):
            name = key[: -len(suffix)].removeprefix("base_model.model.")
            try:
                weight = base_weight(base.get_submodule(name))  # dequantized through the layer when quantized
            except AttributeError:
                continue  # PEFT reports layers the base lacks
            saved = f.get_tensor(key)
            # the singular values of W and W^T are the same; a basis of left singular vectors is one of W^T's right ones
            misfit = (_energies_misfit if saved.ndim == 1 else _basis_misfit)(name, saved, principal_source(weight, side))
            if misfit:
                raise ValueError(f"the base model given is not the one {info.source} was learned on: {misfit}")


#: largest gap between saved principal energies and the given weight's squared singular values, as a share of the
#: largest: the original gives ~1e-6 (the float32 Gram solver) to ~1e-5 (a float32 weight rounded to bfloat16);
#: two random 4096 x 4096 weights differ by ~6e-3 (what concentrates most), pre-trained models far more
_ENERGY_TOLERANCE = 1e-3


def _energies_misfit(name: str, energies: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why saved principal energies are not the top squared singular values of `weight`, or None if they are."""
    p = energies.numel()
    if p == 0:
        return None
    device = weight.device if weight.device.type == "cuda" else "cpu"  # float64 everywhere else too
    values = squared_singular_values(weight.to(device)).cpu()
    if p > values.numel():
        return f"{name} saves {p} principal energies, but that layer's weight has {values.numel()} singular values"
    expected = values[:p]
    scale = torch.maximum(expected[0], energies.max().to(expected)).clamp_min(1e-300)
    gap = float((energies.to(expected) - expected).abs().max() / scale)
    if gap > _ENERGY_TOLERANCE:
        return (
            f"the principal energies saved for {name} are not that layer's top {p} squared singular values (they "
            f"differ by {gap:.2g} of the largest; at most {_ENERGY_TOLERANCE:g} for the original model, with rounding)"
        )
    return None


def _basis_misfit(name: str, basis: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why a saved principal basis is not made of right singular vectors of `weight`, or None if it is."""
    if basis.ndim != 2 or basis.shape[1] < 2 or basis.shape[0] != weight.shape[1]:
        return None  # one direction is always "diagonal"; shapes are checked when the state is loaded
    projected = weight.float() @ basis.to(weight.device, torch.float32)
    gram = projected.T @ projected
    off_diagonal = float((gram - torch.diag(torch.diag(gram))).norm() / gram.norm().clamp_min(1e-30))
    if off_diagonal > 0.02:
        return (
            f"the principal basis saved for {name} is not made of singular vectors of that layer's weight (off-diagonal "
            f"part {off_diagonal:.2g} of (W P)^T W P, about 1e-7 for the original model)"
        )
    return None


def _load_base(name_or_path: str) -> nn.Module:
    """A pre-trained model by Hub id or local path, of the class its config names (LlavaForConditionalGeneration...)."""
    import transformers

    check_local_folder(name_or_path, "base model")
    name_or_path = os.path.expanduser(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        if model_class is None:
            raise ValueError(f"its config names no transformers model class (architectures={architecture!r})")
        return model_class.from_pretrained(name_or_path, dtype="auto")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the base model {name_or_path!r}: {error}") from error


@contextlib.contextmanager
def _first_tasks(model: nn.Module, count: int) -> Iterator[None]:
    """Every layer's task history cut to its first `count` tasks for the duration (the weights are left as they are)."""
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    states = [layer_state(m, adapter) for m in keeplora_layers(tuner.model, adapter).values()]
    saved = [(state.tasks, state.merged_tasks) for state in states]
    try:
        for state in states:
            state.tasks = state.tasks[:count]
        yield
    finally:
        for state, (tasks, merged) in zip(states, saved):
            state.tasks = tasks
            state.merged_tasks = merged


def export_after(
    model: PeftModel,
    index: int,
    out: Path,
    overwrite: bool,
    *,
    merged: bool = False,
    language_model_only: bool = False,
    processor_from: str | os.PathLike | None = None,
) -> Path:
    """The export of the first `index` finished tasks (`export_lora`, or `export_merged`): exact, since each task's
    update is stored on its own."""
    tuner = tuner_of(model)
    progress = tuner.progress(tuner.keeplora_adapter())
    if index > progress.task_index or progress.in_task:
        raise ValueError(f"cannot export the first {index} tasks of a model that has learned {progress.task_index}")

    def export() -> Path:
        if merged:
            return export_merged(model, out, overwrite=overwrite, processor_from=processor_from)
        return export_lora(
            model, out, overwrite=overwrite, language_model_only=language_model_only, processor_from=processor_from
        )

    if index == progress.task_index:
        return export()
    adapter = tuner.keeplora_adapter()
    layers = keeplora_layers(tuner.model, adapter).values()
    # a merged checkpoint of the first tasks needs the weights as they were then, which later merges changed
    if (merged or language_model_only) and any(layer_state(m, adapter).merged_tasks for m in layers):
        raise ValueError(
            f"this run keeps no adapter after task {index}, and its later tasks are merged into its float32 "
            "weights, so a merged checkpoint of the first tasks cannot be rebuilt; export the plain LoRA of the "
            "first tasks (without --merged / --language-model-only), or every learned task"
        )
    with _first_tasks(model, index):
        return export()
