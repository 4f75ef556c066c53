"""`keeplora-hf analyze`: where a model keeps its knowledge, measured on its own data, and the ε_w and γ it suggests.

KeepLoRA++ rests on two structural claims about a pre-trained model:

- intra-layer: general knowledge lives in each weight's *principal* subspace (top right singular vectors by energy),
  task-specific knowledge in the *residual* one, so a LoRA update confined to the residual spares general skills;
- inter-layer: general knowledge lives in *shallow* layers, task-specific adaptation in *deep* ones, so the update
  is scaled by depth (`s_l = γ + (1 − γ) l / (L − 1)`).

`analyze` measures both on a given model and eval sets (some general, some task-specific), by intervening on the
target weights and evaluating after each intervention:

- intra-layer: every target weight replaced by its principal part `W V_p V_pᵀ` at several energy levels (and by its
  residual part `W − W V_p V_pᵀ`);
- inter-layer: one depth group at a time, shallow → deep, reset (weights → their principal part) or perturbed
  (Gaussian noise in the residual subspace, its scale calibrated on the whole model); optionally a plain rank-r LoRA
  fine-tuned on a task in one group at a time (the general sets' drop against the task's gain);
- with that probe, also on every group: the fine-tuned model's own principal-only reconstruction (does the learned,
  specialised knowledge survive it?) and its update split along the pre-trained subspaces (what the task keeps
  when only the residual part of the update, the part KeepLoRA allows, is applied);
- the singular-value spectrum of every target and the rank each energy level keeps.

The original target weights are copied once and put back after every intervention (`WeightSnapshot`); the model
leaves `analyze` bit-identical to how it came in. `recommend` turns the numbers into ε_w and γ with explicit,
printed rules (see its docstring), and `analysis_report.write_analysis` writes JSON, PNG plots and Markdown.
`analyze_recipe` runs it all on what a training recipe's config trains (`recipes/`): its model, targets and tasks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .subspace.principal import COMPUTE_DTYPE, energy_rank

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ENERGIES",
    "DepthGroup",
    "EvalSet",
    "FinetuneSpec",
    "LayerSpectrum",
    "WeightSnapshot",
    "analyze",
    "analyze_recipe",
    "calibrate_perturbation",
    "depth_groups",
    "precollated_eval_set",
    "recommend",
    "target_linears",
]

DEFAULT_ENERGIES = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0)
DEFAULT_GROUPS_PER_STACK = 4
# residual noise scales (x ||W||_F) tried, all targets at once, to calibrate the per-group perturbation ...
PERTURB_LADDER = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# ... the first that leaves at most this share of the general knowledge above chance is used
CALIBRATION_KEEP = 0.75
# ε_w rule: the principal part must keep this share of the general accuracy above chance ...
GENERAL_KEEP = 0.9
# ... while the task-specific accuracy "falls": its retention is at least this much below the general one
TASK_FALL_MARGIN = 0.1
# γ is clipped to this range and rounded to this step
GAMMA_RANGE = (0.1, 1.0)
GAMMA_STEP = 0.05
# the method's defaults, used when the data cannot decide
DEFAULT_EPS_W = 0.6
DEFAULT_GAMMA = 0.2
# a set "knows" something when its accuracy is this far above chance (and above 2 standard errors)
MIN_KNOWLEDGE = 0.05
_SPECTRUM_POINTS = 256
# CPU SVDs of matrices up to this size run on one thread: faster than several, by far on a loaded machine
_SMALL_SVD = 1 << 20
_INDEX = re.compile(r"^\d+$")


# Eval sets ------------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """What one eval set needs: the data, `metric(model, dataset) -> accuracy in [0, 1]`, its chance level and size.

    `chance` is the accuracy of guessing (a destroyed model still gets it): retention is measured above it.
    `size` is the number of samples, for standard errors; `len(dataset)` when not given.
    """

    dataset: Any
    metric: Callable[[nn.Module, Any], float]
    chance: float = 0.0
    size: int | None = None

    def samples(self) -> int:
        if self.size is not None:
            return self.size
        try:
            return len(self.dataset)
        except TypeError:
            return 0


def _as_eval_set(value: Any) -> EvalSet:
    if isinstance(value, EvalSet):
        return value
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        return EvalSet(*value)
    raise TypeError("an eval set is an EvalSet or a tuple (dataset, metric) / (dataset, metric, chance)")


def precollated_eval_set(rows: Sequence[Any], collator: Callable, chance: float = 0.0, batch_size: int = 64) -> EvalSet:
    """An exact-match eval set whose batches are collated once, not again at each of the analysis' evaluations.

    The metric is `continual.evaluation.answer_exact_match` itself, run over the ready batches.
    """
    from .continual.evaluation import answer_exact_match

    batches = [collator(list(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
    metric = answer_exact_match(collator=_first, batch_size=1)
    return EvalSet(batches, metric, chance=chance, size=len(rows))


def _first(items: list[Any]) -> Any:
    return items[0]


@dataclass
class FinetuneSpec:
    """The optional, cheap fine-tuning probe: a plain rank-`rank` LoRA trained on `train_dataset` for `steps` steps.

    `task` names the eval set whose gain is measured. `train_dataset` holds rows for `collator` (or ready batches
    when `collator` is None, then `batch_size` is not used); `loss_fn(model, batch) -> loss` defaults to `model(**batch).loss`. With `reconstruct`,
    the LoRA is also trained on every group at once, merged, and the fine-tuned model's own principal-only
    reconstruction is measured: does the task's new (specialised) knowledge survive it as well as general skills?
    """

    task: str
    train_dataset: Any
    collator: Callable | None = None
    steps: int = 30
    batch_size: int = 16
    rank: int = 8
    lora_alpha: float | None = None
    learning_rate: float = 3e-3
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    reconstruct: bool = True
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        keep = ("task", "steps", "batch_size", "rank", "lora_alpha", "learning_rate", "reconstruct", "seed")
        return {k: v for k, v in asdict(self).items() if k in keep} | {"lora_alpha": self.alpha()}

    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.rank)


# Targets, depth and groups --------------------------------------------------------------------------------------


def target_linears(model: nn.Module, targets: str | Sequence[str]) -> dict[str, nn.Linear]:
    """`nn.Linear` modules whose full name matches `targets` (a regex, `re.fullmatch` as peft does) or is listed."""
    if isinstance(targets, str):
        chosen = {n: m for n, m in model.named_modules() if re.fullmatch(targets, n)}
    else:
        wanted = set(targets)
        chosen = {n: m for n, m in model.named_modules() if n in wanted}
    linears = {n: m for n, m in chosen.items() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"no nn.Linear module of the model matches targets {targets!r}")
    return linears


def stack_position(model: nn.Module, name: str) -> tuple[str, int, int] | None:
    """(stack, layer index, layer count) of a module, by the rule of `tuner.layer.layer_scales`: the outermost
    `nn.ModuleList` on its path, indexed by a number. None outside any stack."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        container_name = ".".join(parts[:i])
        container = modules.get(container_name)
        if isinstance(container, nn.ModuleList) and _INDEX.match(parts[i]):
            return container_name, int(parts[i]), len(container)
    return None


@dataclass
class DepthGroup:
    """A contiguous block of layers of one stack; `depth` is its middle layer's position in the stack, in [0, 1]."""

    name: str
    targets: list[str]
    stack: str = ""
    layers: tuple[int, int] | None = None
    depth: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stack": self.stack, "layers": list(self.layers) if self.layers else None,
                "depth": self.depth, "targets": list(self.targets)}


def depth_groups(
    model: nn.Module, names: Sequence[str], groups: int | Mapping[str, str | Sequence[str]] | None = None
) -> list[DepthGroup]:
    """Split targets into depth groups, shallow -> deep, each transformer stack on its own.

    `groups=None` or an int `k`: each stack's layers in `k` (default 4) contiguous blocks as equal as possible
    (one block per layer when a stack has `k` layers or fewer). A mapping `name -> regex or list of target names`
    gives custom groups, in the mapping's order; their depth is their mean layer position where they lie in a stack.
    """
    if isinstance(groups, Mapping):
        result = []
        for group_name, selector in groups.items():
            members = [n for n in names if (re.fullmatch(selector, n) if isinstance(selector, str) else n in selector)]
            if not members:
                raise ValueError(f"depth group {group_name!r} matches no target")
            positions = [stack_position(model, n) for n in members]
            depths = [p[1] / (p[2] - 1) if p[2] > 1 else 0.0 for p in positions if p is not None]
            stacks = {p[0] for p in positions if p is not None}
            layers = [p[1] for p in positions if p is not None]
            result.append(DepthGroup(
                group_name, members, stack=stacks.pop() if len(stacks) == 1 else "",
                layers=(min(layers), max(layers)) if layers else None,
                depth=sum(depths) / len(depths) if depths else None,
            ))
        return result
    per_stack = DEFAULT_GROUPS_PER_STACK if groups is None else int(groups)
    if per_stack < 1:
        raise ValueError(f"groups must be at least 1, got {per_stack}")
    stacks: dict[str, tuple[int, dict[int, list[str]]]] = {}
    outside = []
    for name in names:
        position = stack_position(model, name)
        if position is None:
            outside.append(name)
            continue
        stack, index, count = position
        stacks.setdefault(stack, (count, {}))[1].setdefault(index, []).append(name)
    result = []
    for stack, (count, by_layer) in stacks.items():
        k = min(per_stack, count)
        bounds = [round(i * count / k) for i in range(k + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            members = [n for layer in range(lo, hi) for n in by_layer.get(layer, [])]
            if not members:
                continue
            middle = (lo + hi - 1) / 2
            label = f"{stack}[{lo}]" if hi - lo == 1 else f"{stack}[{lo}-{hi - 1}]"
            result.append(DepthGroup(label, members, stack, (lo, hi - 1), middle / (count - 1) if count > 1 else 0.0))
    if outside:
        result.append(DepthGroup("outside stacks", outside))
    return result


# Weights: snapshot, spectra, interventions ----------------------------------------------------------------------


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
        return energy_rank(self.singular.square(), energy)

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


def _spectra(snapshot: WeightSnapshot) -> dict[str, LayerSpectrum]:
    """SVDs of the original weights, computed where the model lives (a GPU when it has one)."""
    return {name: LayerSpectrum.of(module.weight) for name, module in snapshot.modules.items()}


def _original_on_device(snapshot: WeightSnapshot, name: str) -> torch.Tensor:
    return snapshot.original[name].to(snapshot.modules[name].weight.device)


def _principal_only(snapshot: WeightSnapshot, spectra: Mapping[str, LayerSpectrum], names: Sequence[str], energy: float) -> None:
    for name in names:
        snapshot.set(name, spectra[name].principal_part(_original_on_device(snapshot, name), energy))


def _residual_only(snapshot: WeightSnapshot, spectra: Mapping[str, LayerSpectrum], names: Sequence[str], energy: float) -> None:
    for name in names:
        snapshot.set(name, spectra[name].residual_part(_original_on_device(snapshot, name), energy))


def _perturb_residual(
    snapshot: WeightSnapshot, spectra: Mapping[str, LayerSpectrum], names: Sequence[str], energy: float, scale: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        original = snapshot.original[name]
        noise = spectra[name].residual_noise(original, energy, scale, generator)
        snapshot.set(name, original.to(COMPUTE_DTYPE) + noise)


# Evaluation and aggregates --------------------------------------------------------------------------------------


def _evaluate(model: nn.Module, eval_sets: Mapping[str, EvalSet]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        return {name: float(s.metric(model, s.dataset)) for name, s in eval_sets.items()}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(accuracy: Mapping[str, float], names: Sequence[str]) -> float | None:
    """Mean accuracy over `names` (e.g. the general sets)."""
    return _mean([accuracy[n] for n in names if n in accuracy])


def _measurement(accuracy: Mapping[str, float], general: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    return {"accuracy": dict(accuracy), "general_mean": aggregate(accuracy, general), "task_mean": aggregate(accuracy, tasks)}


def retention(value: float | None, base: float | None, chance: float) -> float | None:
    """Share of the knowledge above chance that survives: `(value - chance) / (base - chance)`; None if base ~ chance."""
    if value is None or base is None or base - chance < MIN_KNOWLEDGE:
        return None
    return (value - chance) / (base - chance)


# Fine-tuning probe ----------------------------------------------------------------------------------------------


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch).loss


def _training_batches(spec: FinetuneSpec) -> list[Any]:
    """`spec.steps` batches, shuffled by `spec.seed` and collated once: every group trains on the same batches.

    Without a collator, `train_dataset` holds ready batches (and `batch_size` is not used).
    """
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.collator is None:
        loader = DataLoader(spec.train_dataset, batch_size=1, shuffle=True, generator=generator, collate_fn=_first)
    else:
        loader = DataLoader(spec.train_dataset, batch_size=spec.batch_size, shuffle=True, generator=generator,
                            collate_fn=spec.collator, drop_last=len(spec.train_dataset) >= spec.batch_size)
    batches: list[Any] = []
    while len(batches) < spec.steps:
        before = len(batches)
        for batch in loader:
            batches.append(batch)
            if len(batches) == spec.steps:
                break
        if len(batches) == before:
            raise ValueError("the fine-tuning set gives no batch")
    return batches


def _train_lora(model: nn.Module, names: Sequence[str], spec: FinetuneSpec, batches: Sequence[Any], merge: bool) -> nn.Module:
    """Train a plain peft LoRA on `names` only; returns the peft model (merge=False) or the merged base model."""
    from peft import LoraConfig, get_peft_model

    from .statistics import move_to

    pattern = "|".join(re.escape(n) for n in names)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha(), lora_dropout=0.0, target_modules=f"^(?:{pattern})$")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=0.0)
    loss_fn = spec.loss_fn or _default_loss
    device = next(model.parameters()).device
    try:
        peft_model.train()
        for batch in batches:
            loss = loss_fn(peft_model, move_to(batch, device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peft_model.eval()
    except BaseException:
        peft_model.unload()  # take the LoRA layers out again: the caller gets its model's own modules back
        raise
    if merge:
        return peft_model.merge_and_unload()
    return peft_model


def _remove_lora(peft_model: nn.Module) -> nn.Module:
    return peft_model.unload()


# The analysis ---------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    model: nn.Module
    eval_sets: dict[str, EvalSet]
    general: list[str]
    tasks: list[str]
    snapshot: WeightSnapshot
    spectra: dict[str, LayerSpectrum]
    names: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    baseline_general: float | None = None

    def measure(self) -> dict[str, Any]:
        return _measurement(_evaluate(self.model, self.eval_sets), self.general, self.tasks)


def _key(energy: float) -> str:
    return f"{energy:g}"


def analyze(
    model: nn.Module,
    eval_sets: Mapping[str, EvalSet | tuple],
    targets: str | Sequence[str],
    *,
    general: Sequence[str] | None = None,
    energies: Sequence[float] = DEFAULT_ENERGIES,
    groups: int | Mapping[str, str | Sequence[str]] | None = None,
    inter_energy: float | str = "auto",
    perturb_scale: float | str = "auto",
    reset_energy: float | str = "auto",
    finetune: FinetuneSpec | Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure where `model` keeps the knowledge that `eval_sets` test; returns (and writes) the results.

    `eval_sets`: name -> `EvalSet` or `(dataset, metric[, chance])`, two or more. `general` names the sets that
    measure general knowledge (default: the names starting with "general"); the others are task-specific.
    `targets`: the weights to analyse, a regex (fullmatch) or a list of module names, as for peft.
    `energies`: the principal-energy levels of the intra-layer measurement. `groups`: the depth groups of the
    inter-layer one (see `depth_groups`). `inter_energy`: the ε_w whose residual subspace is perturbed there;
    "auto" takes the recommended ε_w. `perturb_scale`: the residual noise's norm relative to `||W||_F`; "auto"
    calibrates it (`calibrate_perturbation`). `reset_energy`: the energy a group's weights are reset to (their
    principal part); "auto": the largest tested energy below `inter_energy` whose reconstruction of every target
    at once loses general knowledge (keeps < 90 %), so a per-group reset shows where that knowledge sits.
    `finetune`: a `FinetuneSpec` (or its fields as a dict) for the fine-tuning probe, None to skip it.
    `output_dir`: where to write analysis.json, summary.md and the plots (nothing written when None).

    The model's target weights (and every other parameter, its `requires_grad` flags and train/eval mode) are the
    same, bit for bit, when this returns or raises.
    """
    sets = {name: _as_eval_set(value) for name, value in eval_sets.items()}
    if len(sets) < 2:
        raise ValueError("analyze needs two or more eval sets, e.g. a general one and a task-specific one")
    general_names = [n for n in sets if n.startswith("general")] if general is None else list(general)
    unknown = [n for n in general_names if n not in sets]
    if unknown:
        raise ValueError(f"general sets {unknown} are not among the eval sets {list(sets)}")
    if not general_names:
        raise ValueError("no general eval set: name one with general=[...] or give it a name starting with 'general'")
    task_names = [n for n in sets if n not in general_names]
    energies = sorted({float(e) for e in energies})
    if not energies or any(not 0.0 <= e <= 1.0 for e in energies):
        raise ValueError(f"energies must be in [0, 1], got {energies}")
    spec = FinetuneSpec(**finetune) if isinstance(finetune, Mapping) else finetune
    if spec is not None and spec.task not in sets:
        raise ValueError(f"finetune task {spec.task!r} is not an eval set; choose from {list(sets)}")

    modules = target_linears(model, targets)
    names = list(modules)
    training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    start = time.perf_counter()
    snapshot = WeightSnapshot(modules)
    spectra = _spectra(snapshot)
    ctx = _Context(model, sets, general_names, task_names, snapshot, spectra, names)
    ctx.timings["svd"] = time.perf_counter() - start
    group_list = depth_groups(model, names, groups)
    chances = {n: s.chance for n, s in sets.items()}

    results: dict[str, Any] = {
        "config": {
            "targets": targets if isinstance(targets, str) else list(targets),
            "energies": energies,
            "groups": [g.name for g in group_list],
            "perturb_scale": perturb_scale,
            "inter_energy": inter_energy,
            "reset_energy": reset_energy,
            "finetune": spec.settings() if spec else None,
            "seed": seed,
            "rules": {"general_keep": GENERAL_KEEP, "task_fall_margin": TASK_FALL_MARGIN,
                      "gamma_range": list(GAMMA_RANGE), "min_knowledge": MIN_KNOWLEDGE},
        },
        "eval_sets": {n: {"chance": s.chance, "size": s.samples(), "general": n in general_names} for n, s in sets.items()},
        "general_sets": general_names,
        "task_sets": task_names,
    }
    try:
        results["baseline"] = _timed(ctx, "baseline", ctx.measure)
        ctx.baseline_general = results["baseline"]["general_mean"]
        results["spectra"] = _spectra_summary(model, spectra, energies)
        results["groups"] = [g.as_dict() for g in group_list]
        results["intra_layer"] = _timed(ctx, "intra_layer", lambda: _intra_layer(ctx, energies))
        results["input_share"] = _timed(ctx, "input_share", lambda: _input_share(ctx, energies))
        if spec is not None:
            results["finetune"] = _timed(ctx, "finetune", lambda: _finetune_probe(ctx, group_list, spec, energies, flags))
        eps_w = recommend_eps_w(results, chances)
        chosen = eps_w["value"] if inter_energy == "auto" else float(inter_energy)
        reset = _reset_energy(eps_w["general_retention"], chosen) if reset_energy == "auto" else float(reset_energy)
        results["inter_layer"] = _timed(
            ctx, "inter_layer", lambda: _inter_layer(ctx, group_list, chosen, reset, perturb_scale, seed, chances)
        )
        results["recommendation"] = recommend(results, chances)
    finally:
        snapshot.restore()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(training)
    if not snapshot.identical():  # pragma: no cover - restore() copies the saved bits back
        raise RuntimeError("the target weights were not restored exactly")
    results["timings_s"] = {k: round(v, 2) for k, v in ctx.timings.items()} | {"total": round(time.perf_counter() - start, 2)}
    if output_dir is not None:
        from .analysis_report import write_analysis

        results["files"] = [str(p) for p in write_analysis(results, output_dir)]
    return results


def _timed(ctx: _Context, name: str, step: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = step()
    ctx.timings[name] = time.perf_counter() - start
    logger.info("analysis: %s done in %.1f s", name, ctx.timings[name])
    return value


def _intra_layer(ctx: _Context, energies: Sequence[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"principal": {}, "residual": {}}
    for energy in energies:
        for kind, intervene in (("principal", _principal_only), ("residual", _residual_only)):
            with ctx.snapshot.intervention():
                intervene(ctx.snapshot, ctx.spectra, ctx.names, energy)
                out[kind][_key(energy)] = ctx.measure()
    return out


def _input_share(ctx: _Context, energies: Sequence[float]) -> dict[str, Any]:
    """Per eval set, the share of each target's input energy inside its principal subspace: `‖x V_p‖² / ‖x‖²`.

    A KeepLoRA update acts only on the residual part of a layer's input, `x (I − V_p V_pᵀ)`. So the principal
    subspace shields general knowledge only where general inputs lie in it and task inputs do not; the weight-side
    reconstruction (`_intra_layer`) cannot show that, this input-side measurement does. One evaluation per set.
    """
    levels = [e for e in energies if 0.0 < e < 1.0]
    out: dict[str, Any] = {}
    for set_name, eval_set in ctx.eval_sets.items():
        along = {n: torch.zeros(len(ctx.spectra[n].singular), dtype=COMPUTE_DTYPE) for n in ctx.names}
        total = dict.fromkeys(ctx.names, 0.0)

        def recorder(name: str) -> Callable[[nn.Module, tuple], None]:
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                coordinates = x.float() @ ctx.spectra[name].vh.to(x.device).T
                along[name] += coordinates.to(COMPUTE_DTYPE).square().sum(0).cpu()
                total[name] += float(x.to(COMPUTE_DTYPE).square().sum())

            return hook

        handles = [ctx.snapshot.modules[n].register_forward_pre_hook(recorder(n)) for n in ctx.names]
        try:
            _evaluate(ctx.model, {set_name: eval_set})
        finally:
            for handle in handles:
                handle.remove()
        layers = {
            n: {_key(e): float(along[n][: ctx.spectra[n].rank(e)].sum()) / total[n] for e in levels}
            for n in ctx.names
            if total[n] > 0
        }
        out[set_name] = {"mean": {_key(e): _mean([v[_key(e)] for v in layers.values()]) for e in levels}, "layers": layers}
    return out


def _reset_energy(general_retention: Mapping[str, float | None], below: float) -> float:
    """The largest tested energy under `below` whose whole-model principal-only reconstruction keeps < 90 % of the
    general knowledge; the smallest tested energy when every one keeps more."""
    losing = [float(e) for e, r in general_retention.items() if float(e) < below and r is not None and r < GENERAL_KEEP]
    if losing:
        return max(losing)
    return min(float(e) for e in general_retention)


def calibrate_perturbation(
    ctx: _Context, energy: float, seed: int, chances: Mapping[str, float]
) -> tuple[float, dict[str, Any]]:
    """The residual noise scale for the per-group measurement, from the data.

    Noise in the residual subspace of *every* target at once, at scales PERTURB_LADDER (relative to `||W||_F`);
    the first scale that removes at least a quarter of the general knowledge above chance (retention <= 75 %) is
    used per group, so each group's share of that loss is measurable. Without such a scale, the largest.
    """
    ladder: dict[str, Any] = {}
    chance = _chance_mean(chances, ctx.general)
    for scale in PERTURB_LADDER:
        with ctx.snapshot.intervention():
            _perturb_residual(ctx.snapshot, ctx.spectra, ctx.names, energy, scale, seed * 1000 + 999)
            ladder[_key(scale)] = ctx.measure()
        kept = retention(ladder[_key(scale)]["general_mean"], ctx.baseline_general, chance)
        if kept is not None and kept <= CALIBRATION_KEEP:
            return scale, ladder
    return PERTURB_LADDER[-1], ladder


def _inter_layer(
    ctx: _Context,
    group_list: Sequence[DepthGroup],
    energy: float,
    reset_energy: float,
    scale: float | str,
    seed: int,
    chances: Mapping[str, float],
) -> dict[str, Any]:
    calibration = None
    if scale == "auto":
        scale, calibration = calibrate_perturbation(ctx, energy, seed, chances)
    out: dict[str, Any] = {"energy": energy, "reset_energy": reset_energy, "perturb_scale": float(scale),
                           "calibration": calibration, "reset": {}, "perturb": {}}
    for index, group in enumerate(group_list):
        with ctx.snapshot.intervention():
            _principal_only(ctx.snapshot, ctx.spectra, group.targets, reset_energy)
            out["reset"][group.name] = ctx.measure()
        with ctx.snapshot.intervention():
            _perturb_residual(ctx.snapshot, ctx.spectra, group.targets, energy, scale, seed * 1000 + index)
            out["perturb"][group.name] = ctx.measure()
    return out


def _finetune_probe(
    ctx: _Context, group_list: Sequence[DepthGroup], spec: FinetuneSpec, energies: Sequence[float], flags: Mapping[str, bool]
) -> dict[str, Any]:
    batches = _training_batches(spec)
    out: dict[str, Any] = {"task": spec.task, "groups": {}}
    for group in group_list:
        with ctx.snapshot.intervention():
            peft_model = _train_lora(ctx.model, group.targets, spec, batches, merge=False)
            try:
                out["groups"][group.name] = _measurement(_evaluate(peft_model, ctx.eval_sets), ctx.general, ctx.tasks)
            finally:
                _remove_lora(peft_model)
                _restore_flags(ctx.model, flags)
    if spec.reconstruct:
        with ctx.snapshot.intervention():
            try:
                _train_lora(ctx.model, ctx.names, spec, batches, merge=True)
            finally:
                _restore_flags(ctx.model, flags)
            tuned = {n: m.weight.detach().clone() for n, m in ctx.snapshot.modules.items()}
            tuned_spectra = {n: LayerSpectrum.of(w) for n, w in tuned.items()}
            reconstruction: dict[str, Any] = {"finetuned": ctx.measure(), "principal": {}}
            for energy in energies:
                for name in ctx.names:
                    ctx.snapshot.set(name, tuned_spectra[name].principal_part(tuned[name], energy))
                reconstruction["principal"][_key(energy)] = ctx.measure()
            reconstruction["update_split"] = _update_split(ctx, tuned, energies)
            out["all_groups"] = reconstruction
    return out


def _update_split(ctx: _Context, tuned: Mapping[str, torch.Tensor], energies: Sequence[float]) -> dict[str, Any]:
    """The fine-tuning update `ΔW = W_tuned - W` split along the *pre-trained* weight's subspaces at each energy.

    "residual": `W + ΔW (I - V_p V_pᵀ)`, the part of the update a KeepLoRA update may contain; "principal":
    `W + ΔW V_p V_pᵀ`, the part it forbids. Does the learned task live in the first, and general damage in the second?
    """
    split: dict[str, Any] = {"residual": {}, "principal": {}}
    for energy in [e for e in energies if 0.0 < e < 1.0]:
        for kind in split:
            for name in ctx.names:
                original = ctx.snapshot.original[name].to(tuned[name].device, COMPUTE_DTYPE)
                delta = tuned[name].to(COMPUTE_DTYPE) - original
                along = ctx.spectra[name].principal_part(delta, energy)
                ctx.snapshot.set(name, original + (delta - along if kind == "residual" else along))
            split[kind][_key(energy)] = ctx.measure()
    return split


def _restore_flags(model: nn.Module, flags: Mapping[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _spectra_summary(model: nn.Module, spectra: Mapping[str, LayerSpectrum], energies: Sequence[float]) -> list[dict[str, Any]]:
    rows = []
    for name, spectrum in spectra.items():
        position = stack_position(model, name)
        values = spectrum.singular
        k = len(values)
        if k > _SPECTRUM_POINTS:
            index = torch.unique(torch.logspace(0, math.log10(k), _SPECTRUM_POINTS).round().long() - 1).tolist()
        else:
            index = list(range(k))
        rows.append({
            "name": name,
            "shape": list(spectrum.shape),
            "stack": position[0] if position else "",
            "layer": position[1] if position else None,
            "depth": (position[1] / (position[2] - 1) if position[2] > 1 else 0.0) if position else None,
            "full_rank": k,
            "ranks": {_key(e): spectrum.rank(e) for e in energies},
            "rank_fraction": {_key(e): spectrum.rank(e) / k for e in energies},
            "spectrum_index": index,
            "singular_values": [float(values[i]) for i in index],
        })
    return rows


# Recipes --------------------------------------------------------------------------------------------------------


def analyze_recipe(
    recipe: str | Path,
    overrides: Sequence[str] = (),
    *,
    eval_size: int | None = None,
    finetune: Mapping[str, Any] | None = MappingProxyType({}),
    **options: Any,
) -> dict[str, Any]:
    """`analyze` on what a training recipe (`recipes/*/config_*.yaml`) trains: its model, its targets, its data.

    The model is loaded as the recipe loads it (a chat VLM with its family's processor and collator, or CLIP; a
    `tiny:` model with its tiny data), on the recipe's device. The weights analysed are the recipe's
    `keeplora.target_modules`, matched as peft matches them. Eval sets: every task's eval split (its first
    `eval_size` rows) scored by the task's own metric (generation, or CLIP's zero-shot classification with chance
    1 / classes), and the recipe's `general_sets`, which are the general ones; in a recipe without general sets, the
    tasks other than the probe's stand for them (what the pre-trained model knows of tasks it has not learned). The
    probe trains on the first task's train split: `finetune` holds `FinetuneSpec` fields (`steps`, `rank`, ...,
    `task` for another task), None skips it.

    `overrides`: the recipe's command-line overrides (`["--data_root", "/data/UCIT"]`). `options`: `analyze`'s other
    keyword arguments (`energies`, `groups`, `output_dir`, `seed`, ...).
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    from .data.collators import clip_classification_loss
    from .recipes_common import (
        TINY_DATA_WRITERS,
        build_chat_tasks,
        build_classification_tasks,
        chat_collator,
        chat_media,
        keeplora_config,
        load_clip,
        load_vlm,
        parse_recipe_args,
        prepare,
    )

    config = parse_recipe_args(["--config", str(recipe), *overrides])
    entries = [*config.tasks, *config.general_sets]
    classification = any("train" in e or "eval" in e for e in entries)  # CLIP's entries name `train` / `eval`
    eval_field = "eval" if classification else "eval_file"
    missing = [e["name"] for e in entries if not e.get(eval_field)]
    if missing:
        raise ValueError(f"{config.source}: {missing} have no `{eval_field}`; analyze evaluates every task and "
                         "general set on its eval split")
    names = [e["name"] for e in entries]
    if len(set(names)) < len(names):
        raise ValueError(f"{config.source}: tasks and general sets need distinct names, got {names}")
    task_names = [t["name"] for t in config.tasks]
    settings = None if finetune is None else dict(finetune)
    probe = task_names[0] if settings is None else settings.pop("task", task_names[0])
    if probe not in task_names:
        raise ValueError(f"the probe's task {probe!r} is not a task of {config.source}: {task_names}")
    general = [g["name"] for g in config.general_sets] or [n for n in task_names if n != probe]
    if not general:
        raise ValueError(f"{config.source}: analyze needs a general eval set besides the probe's task; add "
                         "`general_sets:` or a second task")
    peft_config, _ = keeplora_config(config.keeplora)

    # the recipe tokenises every row of every task before training; the analysis reads a few batches of one task
    config.data.check_lengths = False
    if classification:
        prepare(config, writer=TINY_DATA_WRITERS["classification"])
        model, processor = load_clip(config.model)
        tasks, general_sets, collator = build_classification_tasks(config, processor)
        loss_fn = clip_classification_loss
    else:
        model, processor, family = load_vlm(config.model)
        media = chat_media(config, family)
        prepare(config, writer=TINY_DATA_WRITERS[media])
        collator = chat_collator(config, processor, family)
        tasks, general_sets = build_chat_tasks(config, collator, media=media)
        loss_fn = None
    if not (config.model.load_in_4bit or config.model.load_in_8bit):  # bitsandbytes places its weights itself
        model.to(config.training.device)
    targets = [name for name, _ in model.named_modules() if check_target_module_exists(peft_config, name)]
    if not targets:
        raise ValueError(f"{config.source}: keeplora.target_modules {peft_config.target_modules!r} matches no "
                         f"module of {config.model.model_name_or_path}")
    eval_sets = {}
    for s in [*tasks, *general_sets]:
        # zero-shot classification picks one of the task's classes; a generated answer has no chance level
        chance = 1 / s.eval_dataset.features["label"].num_classes if classification else 0.0
        eval_sets[s.name] = EvalSet(_first_rows(s.eval_dataset, eval_size), s.metric, chance=chance)
    spec = None
    if settings is not None:
        train = next(t.train_dataset for t in tasks if t.name == probe)
        spec = FinetuneSpec(probe, train, collator, loss_fn=loss_fn, **settings)
    return analyze(model, eval_sets, targets, general=general, finetune=spec, **options)


def _first_rows(dataset: Any, count: int | None) -> Any:
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))


# Recommendation -------------------------------------------------------------------------------------------------


def _standard_error(results: Mapping[str, Any], names: Sequence[str]) -> float:
    """Standard error of the mean accuracy over `names` at the baseline (binomial, sets independent)."""
    base = results["baseline"]["accuracy"]
    sets = results["eval_sets"]
    terms = [base[n] * (1 - base[n]) / sets[n]["size"] for n in names if sets[n]["size"]]
    return math.sqrt(sum(terms)) / len(terms) if terms else 0.0


def _chance_mean(chances: Mapping[str, float], names: Sequence[str]) -> float:
    return _mean([chances.get(n, 0.0) for n in names]) or 0.0


def _informative(results: Mapping[str, Any], chances: Mapping[str, float], names: Sequence[str]) -> list[str]:
    """Sets whose baseline accuracy is clearly above chance: the ones with knowledge to lose."""
    base = results["baseline"]["accuracy"]
    keep = []
    for n in names:
        size = results["eval_sets"][n]["size"] or 1
        se = math.sqrt(max(base[n] * (1 - base[n]), 1e-12) / size)
        if base[n] - chances.get(n, 0.0) >= max(MIN_KNOWLEDGE, 2 * se):
            keep.append(n)
    return keep


def _curve(measurements: Mapping[str, Any], reference: Mapping[str, float], names: Sequence[str], chances: Mapping[str, float]) -> dict[str, float | None]:
    """Retention above chance of the mean over `names`, per energy."""
    if not names:
        return {}
    base = aggregate(reference, names)
    chance = _chance_mean(chances, names)
    return {e: retention(aggregate(m["accuracy"], names), base, chance) for e, m in measurements.items()}


def recommend_eps_w(results: Mapping[str, Any], chances: Mapping[str, float]) -> dict[str, Any]:
    """ε_w from the intra-layer measurement.

    Retention = share of accuracy above chance that principal-only reconstruction keeps. Candidates: energies
    below 1 where the general sets keep >= GENERAL_KEEP (90 %). Task accuracy "falls" at an energy when the task
    retention is at least TASK_FALL_MARGIN below the general retention of the same model, where the tasks are the
    fine-tuned task when the fine-tuning probe reconstructed (the knowledge a new task adds), else the task sets
    the model already knows (above chance). ε_w = the largest candidate at which task accuracy falls: the most
    protection that still leaves the task-specific knowledge outside the protected subspace. If task accuracy
    falls at no candidate (or there is no task evidence), the smallest candidate (general knowledge fits there,
    more protection is not supported by the data). If no energy below 1 keeps 90 %, the general knowledge is not
    concentrated in a principal subspace: the method's default 0.6 with a warning.
    """
    intra = results["intra_layer"]["principal"]
    general = results["general_sets"]
    base = results["baseline"]["accuracy"]
    general_curve = _curve(intra, base, general, chances)
    candidates = [e for e, r in general_curve.items() if float(e) < 1.0 and r is not None and r >= GENERAL_KEEP]

    reconstruction = (results.get("finetune") or {}).get("all_groups")
    if reconstruction is not None:
        task = results["finetune"]["task"]
        tuned = reconstruction["finetuned"]["accuracy"]
        task_source = f"the model fine-tuned on {task} (all groups), reconstructed from its own principal parts"
        task_curve = _curve(reconstruction["principal"], tuned, [task], chances)
        same_model_general = _curve(reconstruction["principal"], tuned, general, chances)
        task_sets = [task]
    else:
        task_sets = _informative(results, chances, results["task_sets"])
        task_source = f"the task sets the model knows above chance: {task_sets}" if task_sets else "none"
        task_curve = _curve(intra, base, task_sets, chances)
        same_model_general = general_curve

    def falls(e: str) -> bool:
        t, g = task_curve.get(e), same_model_general.get(e)
        return t is not None and g is not None and t <= g - TASK_FALL_MARGIN

    falling = [e for e in candidates if falls(e)]
    if not candidates:
        below = [e for e in general_curve if float(e) < 1.0]
        value, rule = DEFAULT_EPS_W, (
            f"no energy below 1 keeps {GENERAL_KEEP:.0%} of the general accuracy above chance "
            f"(best: {_fmt_curve(general_curve, below)}): general knowledge is not concentrated in a principal "
            f"subspace of this model at the tested energies; keeping the default {DEFAULT_EPS_W}"
        )
        holds = False
    elif falling:
        value = max(float(e) for e in falling)
        rule = (f"largest energy whose principal part keeps >= {GENERAL_KEEP:.0%} of the general accuracy above "
                f"chance while the task retention is >= {TASK_FALL_MARGIN:.0%} lower")
        holds = True
    else:
        value = min(float(e) for e in candidates)
        why = "no task evidence" if not task_curve else "task accuracy does not fall more than the general one at any candidate"
        rule = (f"smallest energy whose principal part keeps >= {GENERAL_KEEP:.0%} of the general accuracy above "
                f"chance ({why})")
        holds = False
    key = _key(value)
    return {
        "value": value,
        "rule": rule,
        "claim_holds": holds,
        "candidates": [float(e) for e in candidates],
        "general_retention": general_curve,
        "task_source": task_source,
        "task_sets": task_sets,
        "task_retention": task_curve,
        "general_retention_same_model": same_model_general,
        "at_value": {"general_retention": general_curve.get(key), "task_retention": task_curve.get(key)},
    }


def _fit(depths: Sequence[float], drops: Sequence[float]) -> tuple[float, float]:
    """Least squares line `drop = a + b * depth`; (drop at depth 0, drop at depth 1)."""
    n = len(depths)
    mean_d, mean_y = sum(depths) / n, sum(drops) / n
    var = sum((d - mean_d) ** 2 for d in depths)
    slope = sum((d - mean_d) * (y - mean_y) for d, y in zip(depths, drops)) / var if var > 0 else 0.0
    intercept = mean_y - slope * mean_d
    return intercept, intercept + slope


def recommend_gamma(results: Mapping[str, Any]) -> dict[str, Any]:
    """γ from the inter-layer measurement.

    The general accuracy drop when one group's residual subspace is perturbed, `D(depth)`, is fitted by a line over
    the groups' depths (0 = first layer, 1 = last layer of a stack). KeepLoRA++ scales updates by `s(0) = γ` at the
    first layer and `s(1) = 1` at the last; γ = `D(1) / D(0)` makes the expected general damage `s · D` the same at
    both ends (clipped to [0.1, 1], rounded to 0.05). γ = 1 when deep layers are at least as sensitive. When no
    group's drop exceeds two standard errors of the general accuracy, the data cannot decide: the default 0.2.
    """
    inter = results["inter_layer"]
    general = results["general_sets"]
    base = results["baseline"]["general_mean"]
    groups = [g for g in results["groups"] if g["depth"] is not None and g["name"] in inter["perturb"]]
    se = _standard_error(results, general)
    threshold = 2 * se
    drops = {g["name"]: base - inter["perturb"][g["name"]]["general_mean"] for g in groups}
    reset_drops = {g["name"]: base - inter["reset"][g["name"]]["general_mean"] for g in groups}
    evidence: dict[str, Any] = {
        "perturb_scale": inter["perturb_scale"],
        "reset_energy": inter.get("reset_energy"),
        "general_drop_perturb": drops,
        "general_drop_reset": reset_drops,
        "depths": {g["name"]: g["depth"] for g in groups},
        "noise_threshold": threshold,
    }
    if len({g["depth"] for g in groups}) < 2:
        return {"value": DEFAULT_GAMMA, "rule": "fewer than two depths: the data cannot decide; default kept",
                "decided": False, **evidence}
    shallow, deep = _fit([g["depth"] for g in groups], [drops[g["name"]] for g in groups])
    reset_shallow, reset_deep = _fit([g["depth"] for g in groups], [reset_drops[g["name"]] for g in groups])
    evidence |= {"fit_drop_shallow": shallow, "fit_drop_deep": deep,
                 "fit_reset_drop_shallow": reset_shallow, "fit_reset_drop_deep": reset_deep}
    if max(drops.values()) <= threshold:
        return {"value": DEFAULT_GAMMA, "decided": False, **evidence,
                "rule": f"no group's perturbation drops the general accuracy by more than 2 standard errors "
                        f"({threshold:.1%}): the data cannot decide (raise perturb_scale); default kept"}
    if deep >= shallow or shallow <= threshold:
        return {"value": 1.0, "decided": True, **evidence,
                "rule": "deep layers are at least as sensitive as shallow ones for general skills: no depth damping"}
    raw = max(deep, 0.0) / shallow
    value = min(max(round(raw / GAMMA_STEP) * GAMMA_STEP, GAMMA_RANGE[0]), GAMMA_RANGE[1])
    return {"value": round(value, 2), "raw": raw, "decided": True, **evidence,
            "rule": "gamma = fitted general drop at the deepest / at the shallowest depth, so a scaled update costs "
                    "general skills the same at both ends"}


def _finetune_evidence(results: Mapping[str, Any]) -> dict[str, Any] | None:
    probe = results.get("finetune")
    if not probe or not probe.get("groups"):
        return None
    task = probe["task"]
    base = results["baseline"]
    rows = {}
    for group in results["groups"]:
        m = probe["groups"].get(group["name"])
        if m is None:
            continue
        rows[group["name"]] = {
            "depth": group["depth"],
            "task_gain": m["accuracy"][task] - base["accuracy"][task],
            "general_drop": base["general_mean"] - m["general_mean"],
        }
    split = (probe.get("all_groups") or {}).get("update_split")
    return {"task": task, "groups": rows, "update_split": split}


def recommend(results: Mapping[str, Any], chances: Mapping[str, float] | None = None) -> dict[str, Any]:
    """ε_w and γ with the evidence behind them, and the verdicts on the two structural claims."""
    if chances is None:
        chances = {n: s["chance"] for n, s in results["eval_sets"].items()}
    eps_w = recommend_eps_w(results, chances)
    gamma = recommend_gamma(results) if "inter_layer" in results else None
    finetune = _finetune_evidence(results)
    claims = {"intra_layer": eps_w["claim_holds"]}
    if gamma is not None and "fit_drop_shallow" in gamma:
        claims["inter_layer"] = bool(gamma["decided"] and gamma["fit_drop_shallow"] > gamma["fit_drop_deep"])
    return {"eps_w": eps_w, "gamma": gamma, "finetune": finetune, "claims": claims, "text": _text(eps_w, gamma, finetune)}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f} pts"


def _fmt_curve(curve: Mapping[str, float | None], keys: Sequence[str] | None = None) -> str:
    keys = list(curve) if keys is None else keys
    return ", ".join(f"{k}: {_pct(curve.get(k))}" for k in keys)


def _text(eps_w: Mapping[str, Any], gamma: Mapping[str, Any] | None, finetune: Mapping[str, Any] | None) -> str:
    lines = [f"principal_energy (eps_w) = {eps_w['value']:g}: {eps_w['rule']}."]
    lines.append(f"  general retention above chance (principal-only): {_fmt_curve(eps_w['general_retention'])}")
    if eps_w["task_retention"]:
        lines.append(f"  task retention above chance ({eps_w['task_source']}): {_fmt_curve(eps_w['task_retention'])}")
        if eps_w["task_sets"] and eps_w["general_retention_same_model"] is not eps_w["general_retention"]:
            lines.append(f"  general retention of that same model: {_fmt_curve(eps_w['general_retention_same_model'])}")
    else:
        lines.append("  no task evidence: no task set is known above chance and no fine-tuning probe reconstructed")
    if gamma is not None:
        lines.append(f"layer_scale_gamma (gamma) = {gamma['value']:g}: {gamma['rule']}.")
        drops = ", ".join(f"{g}: {_pct(d)}" for g, d in gamma["general_drop_perturb"].items())
        lines.append(f"  general accuracy drop, residual perturbed (noise {gamma['perturb_scale']:g}·||W||) per group "
                     f"(shallow -> deep): {drops}")
        resets = ", ".join(f"{g}: {_pct(d)}" for g, d in gamma["general_drop_reset"].items())
        lines.append(f"  general accuracy drop, group reset to its principal part: {resets}")
        if "fit_drop_shallow" in gamma:
            lines.append(f"  fitted drop at depth 0: {_pct(gamma['fit_drop_shallow'])}, at depth 1: "
                         f"{_pct(gamma['fit_drop_deep'])}; noise level (2 s.e.): {_pct(gamma['noise_threshold'])}")
    if finetune is not None and finetune.get("update_split"):
        task = finetune["task"]
        for kind in ("residual", "principal"):
            cells = ", ".join(f"{e}: task {_pct(m['accuracy'][task])} / general {_pct(m['general_mean'])}"
                              for e, m in finetune["update_split"][kind].items())
            lines.append(f"  W + the {kind} part of the {task} update (pre-trained subspaces): {cells}")
    if finetune is not None:
        rows = ", ".join(f"{g}: task {_signed(r['task_gain'])}, general {_signed(-r['general_drop'])}"
                         for g, r in finetune["groups"].items())
        lines.append(f"  LoRA on one group only, trained on {finetune['task']}: {rows}")
    return "\n".join(lines)
