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
printed rules (see its docstring), and `report.write_analysis` writes JSON, PNG plots and Markdown.
`analyze_recipe` runs it all on what a training recipe's config trains (`recipes/`): its model, targets and tasks.

One job per module: `eval_sets` (the sets and their aggregates), `depth` (targets and depth groups), `interventions`
(snapshot, spectra, weight replacements), `probe` (the LoRA probe's training), `measure` (`analyze`), `recommend`,
`report`, `recipe` (`analyze_recipe`).
"""

from __future__ import annotations

from ..tuner.depth import stack_position
from .depth import DepthGroup, depth_groups, target_linears
from .eval_sets import EvalSet, precollated_eval_set
from .interventions import LayerSpectrum, WeightSnapshot
from .measure import DEFAULT_ENERGIES, analyze, calibrate_perturbation
from .probe import FinetuneSpec
from .recipe import analyze_recipe
from .recommend import DEFAULT_EPS_W, DEFAULT_GAMMA, recommend, recommend_eps_w, recommend_gamma

__all__ = [
    "DEFAULT_ENERGIES",
    "DEFAULT_EPS_W",
    "DEFAULT_GAMMA",
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
    "recommend_eps_w",
    "recommend_gamma",
    "stack_position",
    "target_linears",
]
