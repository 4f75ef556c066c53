"""`keeplora-hf demo`: the offline continual benchmark on the pre-trained demo VLM, every method in one harness."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from peft import get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments

from .baselines import DEFAULT_METHODS, METHODS, Method
from .continual import ContinualRunner, ContinualTask, GeneralSet
from .continual.checkpoint import atomic_write_json, read_json
from .continual.evaluation import answer_exact_match
from .continual.metrics import METRIC_NAMES, compute_all
from .continual.report import terminal_summary, to_jsonable, write_report
from .continual.run_dir import RESULTS_FILE
from .data.collators import VLMChatCollator
from .data.formats import load_llava_json, load_video_qa_json
from .data.synthetic.tasks import IMAGE_TASKS
from .data.synthetic.writer import FORMAT, write_benchmark
from .data.synthetic.videos import NUM_FRAMES
from .models.demo import (
    DEMO_TARGETS,
    VIDEO_MAX_LENGTH,
    build_demo_video_processor,
    load_demo_model,
    video_model_from_image_model,
)
from .models.pretrain import MAX_LENGTH

logger = logging.getLogger(__name__)

DEMO_DTYPES = ("float32", "bfloat16")


@dataclass
class DemoSettings:
    """The benchmark's knobs; the defaults are what the README's table was measured with."""

    output_dir: str = "keeplora-demo"
    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = IMAGE_TASKS
    video: bool = False
    image: bool = True  # False: the video sequence alone (with video=True)
    video_train_size: int = 200
    video_eval_size: int = 60
    video_epochs: float = 10.0  # 200 clips a task: after 3 passes every video task is still at chance
    seeds: tuple[int, ...] = (0,)
    train_size: int = 480
    eval_size: int = 120
    general_size: int = 300
    epochs: float = 3.0
    batch_size: int = 32
    learning_rate: float = 5e-3
    rank: int = 8
    alpha: float = 16.0
    model_path: str | None = None
    overwrite: bool = False
    data_seed: int = 0
    dtype: str = "float32"  # the base model's dtype, as users load it (bfloat16: finished tasks stay a float32 branch)
    orders: int = 1  # task orders: `tasks` as given, then fixed random permutations of it (see `task_orders`)


@dataclass
class Sequence:
    """One continual benchmark: its tasks, general sets, collator and how to get a fresh pre-trained base model."""

    name: str
    tasks: list[ContinualTask]
    general: list[GeneralSet]
    collator: VLMChatCollator
    load_base: Callable[[], nn.Module]
    epochs: float


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run every (sequence, seed, method), resuming finished ones; write per-seed results and a summary."""
    if settings.dtype not in DEMO_DTYPES:
        raise ValueError(f"dtype must be one of {DEMO_DTYPES}, got {settings.dtype!r}")
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)} or 'all'")
    out = Path(settings.output_dir)
    data = _benchmark_data(out / "data", settings)
    orders = task_orders(settings.tasks, settings.orders)
    runs = [(_order_name(k), replace(settings, tasks=order)) for k, order in enumerate(orders)]
    sequences = [(_image_sequence(data, s, name), s) for name, s in runs] if settings.image else []
    if settings.video:
        sequences.append((_video_sequence(data, settings), settings))
    summary: dict[str, Any] = {"settings": asdict(settings), "sequences": {}}
    every_order: dict[tuple[int, int], dict[str, Any]] = {}
    for k, (sequence, run_settings) in enumerate(sequences):
        per_seed = {
            seed: _run_seed(sequence, run_settings, seed, out / sequence.name / f"seed{seed}") for seed in settings.seeds
        }
        summary["sequences"][sequence.name] = _summary(per_seed, settings)
        if sequence.name.startswith("image"):
            every_order.update({(k, seed): results for seed, results in per_seed.items()})
        print(terminal_summary(per_seed[settings.seeds[-1]]))
    if len(orders) > 1:  # the spread over orders and seeds together
        summary["sequences"][f"image, {len(orders)} orders"] = _summary(every_order, settings)
    atomic_write_json(out / "summary.json", to_jsonable(summary))
    (out / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    return summary


def _run_seed(sequence: Sequence, settings: DemoSettings, seed: int, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "tasks": [t.name for t in sequence.tasks], "methods": {}, "config": asdict(settings), "seed": seed,
    }
    for name in settings.methods:
        entry = _run_method(METHODS[name], sequence, settings, seed, out / _slug(name))
        results["methods"][name] = entry["methods"][name]
        results["versions"] = entry.get("versions", {})
    write_report(results, out)
    return results


def task_orders(tasks: tuple[str, ...], count: int) -> list[tuple[str, ...]]:
    """`count` task orders: `tasks` itself, then permutations drawn from fixed seeds (1, 2, ...), all distinct."""
    if count < 1:
        raise ValueError(f"orders must be at least 1, got {count}")
    orders = [tuple(tasks)]
    seed = 0
    while len(orders) < count:
        seed += 1
        candidate = tuple(tasks[i] for i in np.random.default_rng(seed).permutation(len(tasks)))
        if candidate not in orders:
            orders.append(candidate)
        if seed > 1000:
            raise ValueError(f"{len(tasks)} tasks have fewer than {count} distinct orders")
    return orders


def _order_name(index: int) -> str:
    return "image" if index == 0 else f"image-order{index}"


def _image_sequence(data: dict[str, Any], settings: DemoSettings, name: str = "image") -> Sequence:
    _, processor = load_demo_model(settings.model_path)
    collator = VLMChatCollator(processor, max_length=MAX_LENGTH, model_family="llava")
    metric = answer_exact_match(collator, batch_size=64)
    tasks = [ContinualTask(task, data["tasks"][task]["train"], data["tasks"][task]["eval"], metric) for task in settings.tasks]
    general = [GeneralSet("general", data["general"], metric)]
    return Sequence(name, tasks, general, collator, lambda: load_demo_model(settings.model_path)[0], settings.epochs)


def _video_sequence(data: dict[str, Any], settings: DemoSettings) -> Sequence:
    """The video tasks on a LLaVA-NeXT-Video that starts from the pre-trained image model's weights."""
    processor = build_demo_video_processor()
    collator = VLMChatCollator(processor, max_length=VIDEO_MAX_LENGTH, model_family="llava_next_video",
                               num_frames=NUM_FRAMES)
    metric = answer_exact_match(collator, batch_size=16)
    tasks = [ContinualTask(name, split["train"], split["eval"], metric) for name, split in data["video_tasks"].items()]
    general = [GeneralSet("general", data["general"], metric)]
    return Sequence("video", tasks, general, collator,
                    lambda: video_model_from_image_model(load_demo_model(settings.model_path)[0]), settings.video_epochs)


def _run_method(method: Method, sequence: Sequence, settings: DemoSettings, seed: int, out: Path) -> dict[str, Any]:
    if (out / RESULTS_FILE).exists() and not settings.overwrite:
        return _finished(out, settings)
    base = sequence.load_base().to(getattr(torch, settings.dtype))
    tasks, general = sequence.tasks, sequence.general
    config = {"demo": _training_settings(settings)}
    if method.kind == "none":
        return _zero_shot(method, base, tasks, general, out, config)
    if method.kind == "single":
        return _single_task(method, base, sequence, settings, seed, out, config)
    torch.manual_seed(seed)
    model = get_peft_model(base, method.make_config(settings.rank, settings.alpha, DEMO_TARGETS, base))
    args = _training_args(settings, sequence.epochs, seed, out / "trainer")
    if method.kind == "joint":
        return _joint(method, model, tasks, general, sequence.collator, args, out, config)
    runner = ContinualRunner(
        model, tasks, args, out, general_sets=general, data_collator=sequence.collator, method=method.name,
        run_config=config, overwrite=settings.overwrite,
    )
    return runner.run()


def _finished(out: Path, settings: DemoSettings) -> dict[str, Any]:
    """A finished run's results, refused when it was run with other settings: a changed flag must not be ignored."""
    results = read_json(out / RESULTS_FILE)
    recorded = (results.get("config") or {}).get("demo", {})
    current = to_jsonable(_training_settings(settings))
    differing = sorted(k for k in recorded.keys() & current.keys() if recorded[k] != current[k])
    if differing:
        raise ValueError(
            f"{out} holds a finished run with other settings (differs in: {', '.join(differing)}); pass --overwrite "
            "to replace it, or choose another --output-dir"
        )
    return results


def _training_settings(settings: DemoSettings) -> dict[str, Any]:
    """What decides one method's run: not which other methods, seeds or sequences run beside it, nor where it is written."""
    ignored = {"output_dir", "methods", "seeds", "overwrite", "video", "image", "orders"}
    return {k: v for k, v in asdict(settings).items() if k not in ignored}


def _training_args(settings: DemoSettings, epochs: float, seed: int, output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        logging_steps=10,
        save_strategy="epoch",
        report_to=["tensorboard"],
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )


def _evaluate_all(model, tasks, general) -> tuple[list[float], dict[str, float]]:
    model.eval()
    return [t.metric(model, t.eval_dataset) for t in tasks], {g.name: g.metric(model, g.eval_dataset) for g in general}


# A joint run has no sequence, only rows 0 and T: the metrics of a sequence (plasticity, forgetting, ...) are undefined
JOINT_METRICS = ("last", "mfn", "general_retention")


def _entry(
    method: Method,
    matrix: list[list[float | None]],
    general: dict[str, list],
    out: Path,
    config: dict[str, Any],
    defined: tuple[str, ...] = METRIC_NAMES,
) -> dict[str, Any]:
    metrics = compute_all(np.array(matrix, dtype=float), general)
    results = {
        "tasks": None,
        "config": config,
        "methods": {
            method.name: {
                "accuracy_matrix": matrix,
                "general": general,
                "metrics": {k: (v if k in defined else None) for k, v in metrics.items()},
                "timings_s": {},
            }
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS_FILE, to_jsonable(results))
    return results


def _zero_shot(method, model, tasks, general, out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The untouched model: every row of its matrix is the same evaluation."""
    row, kept = _evaluate_all(model, tasks, general)
    rows = len(tasks) + 1
    return _entry(method, [row] * rows, {k: [v] * rows for k, v in kept.items()}, out, config)


def _joint(method, model, tasks, general, collator, args, out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """All tasks' data at once: an upper bound with no sequence, so only rows 0 and T are defined."""
    before, kept_before = _evaluate_all(model, tasks, general)
    union = concatenate_datasets([t.train_dataset for t in tasks]).shuffle(seed=args.seed)
    Trainer(model=model, args=args, train_dataset=union, data_collator=collator).train()
    after, kept_after = _evaluate_all(model, tasks, general)
    gap = [None] * len(tasks)
    matrix = [before] + [gap] * (len(tasks) - 1) + [after]
    kept = {k: [kept_before[k]] + [None] * (len(tasks) - 1) + [kept_after[k]] for k in kept_before}
    return _entry(method, matrix, kept, out, config, defined=JOINT_METRICS)


def _single_task(
    method: Method, base: nn.Module, sequence: Sequence, settings: DemoSettings, seed: int, out: Path,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Each task learned alone from the pre-trained model `base`, with the sequence's budget: row T holds what each
    task reaches on its own (the per-task upper bound a sequence is read against), row 0 the pre-trained model."""
    dtype = getattr(torch, settings.dtype)
    before, kept = _evaluate_all(base, sequence.tasks, sequence.general)
    alone = []
    for index, task in enumerate(sequence.tasks):
        torch.manual_seed(seed)
        base = sequence.load_base().to(dtype)
        model = get_peft_model(base, method.make_config(settings.rank, settings.alpha, DEMO_TARGETS, base))
        args = _training_args(settings, sequence.epochs, seed, out / "trainer" / f"{index:03d}_{_slug(task.name)}")
        Trainer(model=model, args=args, train_dataset=task.train_dataset, data_collator=sequence.collator).train()
        model.eval()
        alone.append(task.metric(model, task.eval_dataset))
    tasks = len(sequence.tasks)
    matrix = [before] + [[None] * tasks] * (tasks - 1) + [alone]
    general = {k: [v] + [None] * tasks for k, v in kept.items()}
    return _entry(method, matrix, general, out, config, defined=("last",))


def _benchmark_data(data_dir: Path, settings: DemoSettings) -> dict[str, Any]:
    """Write the benchmark once in the formats real datasets use, then load it through the same loaders."""
    manifest_file = data_dir / "manifest.json"
    if not manifest_file.exists():
        write_benchmark(
            data_dir,
            general_size=0,  # the general training corpus is pre-training's; the demo only needs the held-out suite
            general_eval_size=settings.general_size,
            train_size=settings.train_size,
            eval_size=settings.eval_size,
            tasks=settings.tasks,
            videos=settings.video,
            video_train_size=settings.video_train_size,
            video_eval_size=settings.video_eval_size,
            seed=settings.data_seed,
        )
    manifest = read_json(manifest_file)
    if settings.video and "video_tasks" not in manifest:  # first --video run over an image-only benchmark
        manifest_file.unlink()
        return _benchmark_data(data_dir, settings)
    if manifest.get("format") != FORMAT:  # its finished runs are of other tasks too: they must not be mixed in
        raise ValueError(f"{data_dir} holds benchmark data of format {manifest.get('format')}, not {FORMAT} (tasks "
                         "have changed since); choose another --output-dir")
    if sorted(manifest["image_task_order"]) != sorted(settings.tasks):
        raise ValueError(f"{data_dir} holds a benchmark of other tasks {manifest['image_task_order']}; use --overwrite")

    def load(entry: dict[str, Any]) -> Dataset:
        return load_llava_json(data_dir / entry["path"], data_dir)

    def load_video(entry: dict[str, Any]) -> Dataset:
        return load_video_qa_json(data_dir / entry["path"], data_dir)

    splits = ("train", "eval")
    data = {
        "tasks": {name: {split: load(manifest["image_tasks"][name][split]) for split in splits} for name in settings.tasks},
        "general": load(manifest["general"]["eval"]),
    }
    if settings.video:
        data["video_tasks"] = {
            name: {split: load_video(manifest["video_tasks"][name][split]) for split in splits}
            for name in manifest["video_task_order"]
        }
    return data


def _summary(per_seed: dict[Any, dict[str, Any]], settings: DemoSettings) -> dict[str, Any]:
    """Mean and standard deviation over the runs (seeds, or (order, seed) pairs) of every metric, per method."""
    methods = {}
    for name in settings.methods:
        values = {k: [per_seed[s]["methods"][name]["metrics"][k] for s in per_seed] for k in METRIC_NAMES}
        methods[name] = {
            k: {"mean": _nanstat(np.nanmean, v), "std": _nanstat(np.nanstd, v), "n": int(np.sum(~np.isnan(np.array(v, dtype=float))))}
            for k, v in values.items()
        }
    runs = [run if isinstance(run, int) else f"order{run[0]}/seed{run[1]}" for run in per_seed]
    return {"seeds": runs, "methods": methods}


def _nanstat(fn, values: list[float | None]) -> float:
    array = np.array([np.nan if v is None else v for v in values], dtype=float)
    return float(fn(array)) if np.any(~np.isnan(array)) else float("nan")


# The README's columns: metric key -> header
SUMMARY_COLUMNS = {
    "mft": "MFT (plasticity)", "last": "Last", "avg": "Avg", "maa": "MAA", "bwt": "BWT", "forgetting": "forgetting",
    "transfer": "transfer", "general_retention": "general retention",
}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The README's tables: one per sequence, metrics in %, mean ± std over the seeds that define them."""
    lines = []
    for name, sequence in summary["sequences"].items():
        lines += [
            f"### {name} sequence — seeds {', '.join(map(str, sequence['seeds']))} (mean ± std, %)",
            "",
            "| method | seeds | " + " | ".join(SUMMARY_COLUMNS.values()) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in SUMMARY_COLUMNS) + " |",
        ]
        for method, metrics in sequence["methods"].items():
            cells = []
            for key in SUMMARY_COLUMNS:
                m = metrics[key]
                cells.append("–" if np.isnan(m["mean"]) else f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}")
            seeds = max(metrics[key]["n"] for key in SUMMARY_COLUMNS)
            lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)
