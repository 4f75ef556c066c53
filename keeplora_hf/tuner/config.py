"""`KeepLoRAConfig`: a `LoraConfig` with the knobs of KeepLoRA++."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from .registration import KEEPLORA_PEFT_TYPE

FEATURE_SOURCES = ("activations", "gradients")
LORA_A_INITS = ("residual_gradient", "random", "minor_singular")


@dataclass
class KeepLoRAConfig(LoraConfig):
    """Configuration of a KeepLoRA++ adapter.

    Everything `LoraConfig` offers for plain `nn.Linear` targets applies (rank, alpha, targets, dropout,
    `rank_pattern`, `alpha_pattern`, `modules_to_save`). The fields below add the continual-learning method of
    `ALGORITHM.md`; variants that change what a LoRA layer computes (DoRA, LoRA biases, target parameters) are
    refused because KeepLoRA++ merges `s * B @ A` into the base weight after every task.
    """

    principal_energy: float = field(
        default=0.6,
        metadata={
            "help": "epsilon_w: fraction of a pre-trained weight's spectral energy (sum of squared singular values) "
            "whose right singular vectors form the protected principal subspace. In [0, 1]; 0 protects nothing."
        },
    )
    feature_energy: float = field(
        default=0.99,
        metadata={
            "help": "epsilon_f: after each task, feature directions are added to the memory until this fraction of "
            "the task's feature energy is explained (GPM criterion). In [0, 1]; 0 keeps no memory."
        },
    )
    layer_scale_gamma: float = field(
        default=0.2,
        metadata={
            "help": "gamma: layer l of a stack of L layers scales its LoRA branch by gamma + (1 - gamma) * l / (L - 1). "
            "In (0, 1]; 1.0 turns layer scaling off (plain KeepLoRA)."
        },
    )
    gradient_data_ratio: float = field(
        default=0.2,
        metadata={
            "help": "Fraction of a task's batches used for the gradient estimate at `begin_task` and the feature "
            "statistics at `end_task`. In (0, 1]."
        },
    )
    train_lora_A: bool = field(
        default=False,
        metadata={
            "help": "Train A as well as B. Every update of A is then projected back onto the residual subspace after "
            "each optimizer step, which keeps it exact under AdamW."
        },
    )
    feature_source: Literal["activations", "gradients"] = field(
        default="activations",
        metadata={
            "help": "What the feature memory is built from: the layer's input activations (the reference CLIP code) or "
            "the input side of the per-batch weight gradients (the reference LLaVA code)."
        },
    )

    lora_A_init: Literal["residual_gradient", "random", "minor_singular"] = field(
        default="residual_gradient",
        metadata={
            "help": "How begin_task chooses A: the top singular directions of the residual gradient (KeepLoRA), "
            "LoRA's random init, or the weight's minor singular directions (MiLoRA). The last two exist for "
            "baselines in the same harness; every choice is projected onto the residual subspace."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = KEEPLORA_PEFT_TYPE
        _check_range("principal_energy", self.principal_energy, 0.0, 1.0, "[0, 1]", low_open=False)
        _check_range("feature_energy", self.feature_energy, 0.0, 1.0, "[0, 1]", low_open=False)
        _check_range("layer_scale_gamma", self.layer_scale_gamma, 0.0, 1.0, "(0, 1]", low_open=True)
        _check_range("gradient_data_ratio", self.gradient_data_ratio, 0.0, 1.0, "(0, 1]", low_open=True)
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source must be one of {FEATURE_SOURCES}, got {self.feature_source!r}")
        if self.lora_A_init not in LORA_A_INITS:
            raise ValueError(f"lora_A_init must be one of {LORA_A_INITS}, got {self.lora_A_init!r}")
        if not isinstance(self.train_lora_A, bool):
            raise ValueError(f"train_lora_A must be a bool, got {self.train_lora_A!r}")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        unsupported = {
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "target_parameters": bool(self.target_parameters),
            "use_rslora": self.use_rslora,
        }
        for name, value in unsupported.items():
            if value:
                raise ValueError(
                    f"{name} is not supported by KeepLoRA: each task's update is merged into the base weight as "
                    "s * B @ A, which leaves no room for it. Set it to its default."
                )


def _check_range(name: str, value: float, low: float, high: float, shown: str, *, low_open: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number in {shown}, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        raise ValueError(f"{name} must be in {shown}, got {value}")
