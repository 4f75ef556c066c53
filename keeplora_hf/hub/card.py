"""The model card of a continual run (``model_cards/keeplora_adapter.md``, rendered with `huggingface_hub.ModelCard`):
metadata for the Hub, the task sequence, the hyperparameters, the accuracy matrix and metrics, and how to load it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import ModelCard, ModelCardData

from ..continual.metrics import METRIC_NAMES, compute_all
from ..continual.report import MISSING, METRIC_HELP, format_percent, markdown_table, matrix_rows, plot_names
from ..continual.run_dir import ADAPTER_FILES, RESULTS_FILE, ROW_FILE, ROW_ZERO, RUN_FILE, TASKS_DIR, RunInfo
from ..tuner.peft_type import KEEPLORA_PEFT_TYPE
from .repo import hub_model_id, open_run

# the card templates: model_cards/ at the repository root, reached through the package link keeplora_hf/model_cards
# (setuptools copies the linked files into wheels)
DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "keeplora_adapter.md"
CARD_TAGS = ("keeplora", "lora", "continual-learning")
PLAIN_LORA_DIR = "plain_lora"
ADAPTER_HYPERPARAMETERS = (
    "r", "lora_alpha", "target_modules", "principal_energy", "feature_energy", "layer_scale_gamma",
    "gradient_data_ratio", "train_lora_A", "lora_A_init", "feature_source", "activation_statistic", "principal_side",
    "lora_dropout", "rank_pattern", "alpha_pattern", "modules_to_save",
)


def render_card(
    run: str | os.PathLike | RunInfo,
    *,
    repo_id: str | None = None,
    after_task: int | None = None,
    revision: str | None = None,
    revisions: dict[int, str] | None = None,
    base_model_id: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    pipeline_tag: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card of a run (of its state after `after_task`, default the last learned task).

    `base_model_id` names the base model on the Hub when the adapter records a local path or nothing; `revision` is
    the revision the card is uploaded to (its snippets load it), `revisions` the per-task revisions to list.
    """
    info = open_run(run)
    upto = info.checked_task(after_task)
    results = info.results_after(upto)
    entry = results["methods"][info.method]
    recorded = info.base_model_name
    base_id = hub_model_id(base_model_id) or hub_model_id(recorded)
    if base_model_id and not hub_model_id(base_model_id):
        raise ValueError(f"base_model_id {base_model_id!r} is not a Hub model id ('namespace/name')")
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_id,
        tags=[*CARD_TAGS, *([f"base_model:adapter:{base_id}"] if base_id else [])],
        pipeline_tag=pipeline_tag or _pipeline_tag(info.adapter_config),
        datasets=list(datasets) if datasets else _strings(info.config.get("datasets")),
        license=license or (info.config.get("license") if isinstance(info.config.get("license"), str) else None),
    )
    R = np.array(entry["accuracy_matrix"], dtype=float)
    header, rows = matrix_rows(R, info.tasks, entry.get("general") or {}, MISSING)
    metrics = entry.get("metrics") or compute_all(R, entry.get("general") or None)
    metric_rows = [[name, format_percent(metrics.get(name)), METRIC_HELP[name]] for name in METRIC_NAMES]
    heatmap, curve = plot_names(info.method)
    peft_config = {**(info.config.get("peft_config") or {}), **info.adapter_config}
    revisions = revisions or {}
    title = repo_id.split("/")[-1] if repo_id else f"KeepLoRA++ run: {', '.join(info.tasks[:upto])}"
    kwargs = dict(
        title=title,
        repo_id=repo_id or "<repo_id>",
        revision=revision,
        revision_note=(
            f"the state after task {upto} of {len(info.tasks)} ({info.tasks[upto - 1]}); the main branch holds the "
            "latest state" if revision else None
        ),
        learned=upto,
        total=len(info.tasks),
        base_model=base_id,
        base_model_note=_base_model_note(recorded),
        method=info.method,
        base_class=(info.adapter_config.get("auto_mapping") or {}).get("base_model_class"),
        peft_type=info.adapter_config.get("peft_type", KEEPLORA_PEFT_TYPE),
        rank=info.adapter_config.get("r"),
        continued_from=_public_source((info.seeded_from or {}).get("source")),
        tasks=[
            {
                "index": i,
                "name": _cell(name),
                "learned": i <= upto,
                "revision": revisions.get(i),
                "data": (info.config.get("data") or {}).get(name, "?"),
            }
            for i, name in enumerate(info.tasks, start=1)
        ],
        general_sets=info.general_sets,
        missing=MISSING,
        matrix_table="\n".join(markdown_table(header, rows)),
        metrics_table="\n".join(markdown_table(["metric", "value (%)", "meaning"], metric_rows, text_columns=(0, 2))),
        plots=[
            {"alt": f"{info.method}: accuracy matrix", "file": heatmap},
            {"alt": f"{info.method}: accuracy over the sequence", "file": curve},
        ],
        adapter_hyperparameters=[
            (name, _cell(_plain(peft_config[name])))
            for name in ADAPTER_HYPERPARAMETERS
            if peft_config.get(name) not in (None, {}, [])
        ],
        training_hyperparameters=[
            (name, _cell(_plain(value)))
            for name, value in (info.config.get("training") or {}).items()
            if value is not None
        ],
        files=_card_files(heatmap, curve),
        versions=", ".join(f"{k} {v}" for k, v in (results.get("versions") or {}).items()) or "versions not recorded",
        seed=results.get("seed", "?"),
    )
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found")
    return ModelCard.from_template(card_data, template_path=str(template), **kwargs)


def _card_files(heatmap: str, curve: str) -> list[dict[str, str]]:
    return [
        {
            "path": ", ".join(ADAPTER_FILES),
            "what": "the KEEPLORA adapter with the whole continual state (load after `import keeplora_hf`)",
        },
        {"path": f"{PLAIN_LORA_DIR}/", "what": "the same change as one plain LoRA, for PEFT alone"},
        {"path": RESULTS_FILE, "what": "accuracy matrix, general sets, metrics, timings, configuration"},
        {"path": "report.md", "what": "the run's report"},
        {"path": f"{heatmap}, {curve}", "what": "accuracy heatmap and accuracy over the sequence"},
        {
            "path": f"{RUN_FILE}, {ROW_ZERO}, {TASKS_DIR}/NNN_<name>/{ROW_FILE}",
            "what": "the run record, to continue the sequence (`seed_run_dir`)",
        },
    ]


def _public_source(source: str | None) -> str | None:
    """A seeded run's source as the card may show it: a repo id as it is, a local path by its last name only."""
    if not source:
        return None
    if hub_model_id(source.split("@", 1)[0]):
        return f"`{source}`"
    return f"a local run (`{Path(source).name}`)"


def _base_model_note(recorded: str | None) -> str:
    if not recorded:
        return "a model built from a config (the adapter records no base model id)"
    if not hub_model_id(recorded):
        return f"a local checkpoint (`{Path(recorded).name}`), not on the Hub"
    return f"`{recorded}`"


def _pipeline_tag(adapter_config: dict[str, Any]) -> str | None:
    name = ((adapter_config.get("auto_mapping") or {}).get("base_model_class")) or ""
    if not name:
        return None
    from transformers.models.auto import modeling_auto as auto

    if "Video" in name:
        return "video-text-to-text"
    for mapping, tag in (
        ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "image-text-to-text"),
        ("MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES", "zero-shot-image-classification"),
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ):
        if name in getattr(auto, mapping, {}).values():
            return tag
    return None


def _strings(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value) or None
    return None


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _cell(text: str) -> str:
    return str(text).replace("|", r"\|").replace("\n", " ")
