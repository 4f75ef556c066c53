"""`keeplora-hf demo`: the offline continual benchmark on the pre-trained demo VLM, every method in one harness."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from .baselines import DEFAULT_METHODS, METHODS
from .clip_demo import clip_data, clip_sequence
from .continual import ContinualTask, GeneralSet
from .continual.checkpoint import atomic_write_json, read_json
from .continual.evaluation import answer_exact_match
from .continual.report import terminal_summary, to_jsonable
from .data.collators import VLMChatCollator
from .data.formats import load_llava_json, load_video_qa_json
from .data.synthetic.classification import CLIP_TASKS
from .data.synthetic.tasks import IMAGE_TASKS
from .data.synthetic.writer import FORMAT, write_benchmark
from .data.synthetic.videos import NUM_FRAMES
from .harness import Budget, Sequence, run_sequence, summarize, summary_markdown
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
    image: bool = True  # False: the video and/or CLIP sequences alone
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
    orders: int = 1  # task orders of the image and CLIP sequences: as given, then fixed permutations (`task_orders`)
    clip: bool = False  # also the CLIP classification sequence, on the pre-trained demo CLIP (`keeplora_hf.clip_demo`)
    clip_tasks: tuple[str, ...] = CLIP_TASKS
    clip_train_size: int = 480
    clip_eval_size: int = 120
    clip_epochs: float = 3.0
    clip_learning_rate: float = 5e-3
    clip_model_path: str | None = None
    summary_only: bool = False  # run nothing: summarise the finished runs of `methods` in `output_dir`


# Settings of no sequence's runs: which methods, seeds and sequences run beside a run, and where it is written.
_NOT_RECORDED = ("output_dir", "methods", "seeds", "overwrite", "video", "image", "orders", "clip", "summary_only")


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run every (sequence, seed, method), resuming finished ones; write per-seed results and a summary."""
    if settings.dtype not in DEMO_DTYPES:
        raise ValueError(f"dtype must be one of {DEMO_DTYPES}, got {settings.dtype!r}")
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)} or 'all'")
    if not (settings.image or settings.video or settings.clip):
        raise ValueError("no sequence to run: without the image sequence, ask for --video and/or --clip")
    out = Path(settings.output_dir)
    data = _benchmark_data(out / "data", settings) if settings.image or settings.video else {}
    # (family, task order index, sequence, the settings it runs with)
    sequences: list[tuple[str, int, Sequence, DemoSettings]] = []
    if settings.image:
        for k, order in enumerate(task_orders(settings.tasks, settings.orders)):
            run_settings = replace(settings, tasks=order)
            sequences.append(("image", k, _image_sequence(data, run_settings, _order_name("image", k)), run_settings))
    if settings.video:
        sequences.append(("video", 0, _video_sequence(data, settings), settings))
    if settings.clip:
        clip_tables = clip_data(out / "data" / "clip", settings.clip_tasks, train_size=settings.clip_train_size,
                                eval_size=settings.clip_eval_size, general_size=settings.general_size,
                                seed=settings.data_seed)
        for k, order in enumerate(task_orders(settings.clip_tasks, settings.orders)):
            run_settings = replace(settings, clip_tasks=order)
            sequences.append(("clip", k, _clip_sequence(clip_tables, run_settings, _order_name("clip", k)), run_settings))
    summary: dict[str, Any] = {"settings": asdict(settings), "sequences": {}}
    every_order: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for family, k, sequence, run_settings in sequences:
        per_seed = {
            seed: run_sequence(sequence, settings.methods, seed, out / sequence.name / f"seed{seed}",
                               overwrite=settings.overwrite, config=asdict(run_settings),
                               finished_only=settings.summary_only)
            for seed in settings.seeds
        }
        summary["sequences"][sequence.name] = summarize(per_seed)
        every_order.setdefault(family, {}).update({(k, seed): results for seed, results in per_seed.items()})
        print(terminal_summary(per_seed[settings.seeds[-1]]))
    if settings.orders > 1:  # the spread over orders and seeds together
        for family in ("image", "clip"):
            if family in every_order:
                summary["sequences"][f"{family}, {settings.orders} orders"] = summarize(every_order[family])
    atomic_write_json(out / "summary.json", to_jsonable(summary))
    (out / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    return summary


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


def _order_name(family: str, index: int) -> str:
    return family if index == 0 else f"{family}-order{index}"


def _image_sequence(data: dict[str, Any], settings: DemoSettings, name: str = "image") -> Sequence:
    _, processor = load_demo_model(settings.model_path)
    collator = VLMChatCollator(processor, max_length=MAX_LENGTH, model_family="llava")
    metric = answer_exact_match(collator, batch_size=64)
    tasks = [ContinualTask(task, data["tasks"][task]["train"], data["tasks"][task]["eval"], metric) for task in settings.tasks]
    general = [GeneralSet("general", data["general"], metric)]
    return Sequence(name, tasks, general, collator, lambda: load_demo_model(settings.model_path)[0],
                    _budget(settings, settings.epochs), DEMO_TARGETS, _recorded(settings))


def _video_sequence(data: dict[str, Any], settings: DemoSettings) -> Sequence:
    """The video tasks on a LLaVA-NeXT-Video that starts from the pre-trained image model's weights."""
    processor = build_demo_video_processor()
    collator = VLMChatCollator(processor, max_length=VIDEO_MAX_LENGTH, model_family="llava_next_video",
                               num_frames=NUM_FRAMES)
    metric = answer_exact_match(collator, batch_size=16)
    tasks = [ContinualTask(name, split["train"], split["eval"], metric) for name, split in data["video_tasks"].items()]
    general = [GeneralSet("general", data["general"], metric)]
    return Sequence("video", tasks, general, collator,
                    lambda: video_model_from_image_model(load_demo_model(settings.model_path)[0]),
                    _budget(settings, settings.video_epochs), DEMO_TARGETS, _recorded(settings))


def _clip_sequence(data: dict[str, Any], settings: DemoSettings, name: str = "clip") -> Sequence:
    budget = _budget(settings, settings.clip_epochs, settings.clip_learning_rate)
    recorded = {k: v for k, v in asdict(settings).items() if k.startswith("clip_")}
    recorded.update(rank=settings.rank, alpha=settings.alpha, batch_size=settings.batch_size, dtype=settings.dtype,
                    data_seed=settings.data_seed, general_size=settings.general_size)
    return clip_sequence(data, budget, recorded, model_path=settings.clip_model_path, tasks=settings.clip_tasks,
                         name=name)


def _budget(settings: DemoSettings, epochs: float, learning_rate: float | None = None) -> Budget:
    return Budget(epochs, settings.batch_size, learning_rate or settings.learning_rate, settings.rank, settings.alpha,
                  settings.dtype)


def _recorded(settings: DemoSettings) -> dict[str, Any]:
    """What decides an image or video run (as recorded in its results, which a resumed run is checked against)."""
    return {k: v for k, v in asdict(settings).items() if k not in _NOT_RECORDED and not k.startswith("clip_")}


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
