"""The methods the benchmark compares, behind one interface: a PEFT config for a given rank and targets.

Every LoRA-family baseline is a `KeepLoRAConfig` with the parts of KeepLoRA++ it lacks switched off, so all of them
share one training loop, one merge-after-each-task, one checkpoint format and one resume path:

- sequential LoRA: random `A`, both factors trained, nothing protected, no layer scaling; merged after each task.
- MiLoRA-style: like sequential LoRA, but `A` starts on the weight's minor singular directions.
- InfLoRA-style: the feature memory of earlier tasks only (no principal subspace), `A` from the residual gradient.
- KeepLoRA: principal subspace + feature memory, no layer scaling (gamma = 1).
- KeepLoRA++: KeepLoRA with the shallow-to-deep layer scaling (gamma = 0.2), plus energy-threshold ablations.
- KeepLoRA++cls: KeepLoRA++ plus a cosine head per task over CLIP's image features (CLIP sequences only).

OSF is PEFT's own orthogonal-subspace tuner with the same trainable rank; joint multi-task LoRA (all tasks at once)
is the upper bound; zero-shot is the untouched model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig, OSFConfig, PeftConfig
from torch import nn

from .tuner.config import KeepLoRAConfig

ConfigFactory = Callable[[int, float, str, nn.Module], PeftConfig]


@dataclass(frozen=True)
class Method:
    """How one compared method adapts the model; `kind` says how the benchmark drives it."""

    name: str
    description: str
    make_config: ConfigFactory | None = None
    #: how the benchmark drives it: "sequential" (task after task), "joint" (all tasks at once), "single" (each task
    #: alone from the pre-trained model) or "none" (zero-shot)
    kind: str = "sequential"
    #: a cosine head per task over the image features (KeepLoRA++cls): classification sequences only
    classifier_heads: bool = False


def _keeplora(**settings: Any) -> ConfigFactory:
    def make(r: int, alpha: float, targets: str, model: nn.Module) -> PeftConfig:
        return KeepLoRAConfig(r=r, lora_alpha=alpha, target_modules=targets, **settings)

    return make


_PLAIN = dict(principal_energy=0.0, feature_energy=0.0, layer_scale_gamma=1.0, train_lora_A=True)


def _osf(r: int, alpha: float, targets: str, model: nn.Module) -> PeftConfig:
    """OSF trains `min(d_out, d_in) - effective_rank` minor directions per layer: keep exactly `r` of them trainable."""
    preserved = {
        re.escape(name): min(module.weight.shape) - r
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(targets, name)
    }
    return OSFConfig(target_modules=targets, effective_rank=next(iter(preserved.values())), rank_pattern=preserved)


def _lora(r: int, alpha: float, targets: str, model: nn.Module) -> PeftConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero-shot", "the pre-trained model, no training", kind="none"),
        Method("seq-lora", "sequential LoRA, merged after each task", _keeplora(**_PLAIN, lora_A_init="random")),
        Method("milora-style", "sequential LoRA started on minor singular directions",
               _keeplora(**_PLAIN, lora_A_init="minor_singular")),
        Method("inflora-style", "feature memory only (no principal subspace), gamma = 1",
               _keeplora(principal_energy=0.0, layer_scale_gamma=1.0)),
        Method("osf", "PEFT's OSF tuner, trainable rank r", _osf),
        Method("keeplora", "KeepLoRA: principal subspace + feature memory, gamma = 1", _keeplora(layer_scale_gamma=1.0)),
        Method("keeplora++", "KeepLoRA++: + layer scaling, gamma = 0.2", _keeplora(layer_scale_gamma=0.2)),
        Method("keeplora++cls", "KeepLoRA++ with a cosine classifier head per task (classification sequences only)",
               _keeplora(layer_scale_gamma=0.2), classifier_heads=True),
        Method("keeplora++ eps_w=0.3", "KeepLoRA++ with a smaller principal subspace", _keeplora(principal_energy=0.3)),
        Method("keeplora++ eps_w=0.9", "KeepLoRA++ with a larger principal subspace", _keeplora(principal_energy=0.9)),
        Method("keeplora++ eps_f=0.9", "KeepLoRA++ with a smaller feature memory", _keeplora(feature_energy=0.9)),
        Method("keeplora++ eps_f=0.999", "KeepLoRA++ with a larger feature memory", _keeplora(feature_energy=0.999)),
        Method("keeplora++ memory=mean_gradient", "KeepLoRA++ with the reference LLaVA memory (mean-gradient input side)",
               _keeplora(feature_source="mean_gradient")),
        Method("keeplora++ statistic=position_mean", "KeepLoRA++ whose memory grows from position-averaged layer inputs "
               "(the reference CLIP code's statistic)", _keeplora(activation_statistic="position_mean")),
        Method("keeplora++ memory=gradients", "KeepLoRA++ with the memory from per-batch gradient covariances",
               _keeplora(feature_source="gradients")),
        Method("joint-lora", "one LoRA on all tasks at once (upper bound)", _lora, kind="joint"),
        Method("single-task-lora", "each task learned alone from the pre-trained model (per-task upper bound)", _lora,
               kind="single"),
    )
}
DEFAULT_METHODS = ("keeplora++", "seq-lora")
