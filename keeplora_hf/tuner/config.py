"""`KeepLoRAConfig`: a `LoraConfig` with the knobs of KeepLoRA++."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig
from torch import nn

from ..subspace.memory import MEMORY_SOLVERS
from ..subspace.principal import PRINCIPAL_SIDES, PRINCIPAL_SOLVERS
from .adapter_files import check_adapter_files
from .lora_fields import check_ranks_and_alphas, is_integer, refuse_unverified_fields
from .peft_type import KEEPLORA_PEFT_TYPE
from .weights import merges_exactly

FEATURE_SOURCES = ("activations", "gradients", "mean_gradient")
ACTIVATION_STATISTICS = ("second_moment", "position_mean")
LORA_A_INITS = ("residual_gradient", "random", "minor_singular")
GRADIENT_ESTIMATORS = ("sketch", "exact")
STATE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
FINISHED_TASKS = ("auto", "branch", "merge")


@dataclass
class KeepLoRAConfig(LoraConfig):
    """Configuration of a KeepLoRA++ adapter.

    The `LoraConfig` fields verified with KeepLoRA++ apply (rank, alpha, targets and exclusions, dropout, layer
    selection, `rank_pattern`, `alpha_pattern`, `modules_to_save`); every other `LoraConfig` field is refused at any
    value but its default (`tuner/lora_fields.py`), a field of a later `peft` release included, because KeepLoRA++
    keeps each finished task as exactly `s * B @ A` (merged or as a frozen branch) on the base weights it protects.

    Args:
        principal_energy (`float`, defaults to 0.6): epsilon_w, the share of each pre-trained weight's spectral energy
            whose top singular vectors are protected.
        feature_energy (`float`, defaults to 0.99): epsilon_f, the GPM threshold that grows the feature memory.
        layer_scale_gamma (`float`, defaults to 0.2): gamma of the depth scale `gamma + (1 - gamma) l / (L - 1)`.
        gradient_data_ratio (`float`, defaults to 0.2): share of a task's batches for the statistics passes.
        train_lora_A (`bool`, defaults to `False`): also train `A`, re-projected after every optimizer step.
        feature_source (`str`, defaults to `"activations"`): `"activations"`, `"mean_gradient"` or `"gradients"`.
        activation_statistic (`str`, defaults to `"second_moment"`): `"second_moment"` or `"position_mean"`.
        memory_sketch_rows (`int`, defaults to 512): rows of the mean-gradient sketch.
        lora_A_init (`str`, defaults to `"residual_gradient"`): `"residual_gradient"`, `"random"` or `"minor_singular"`.
        gradient_estimator (`str`, defaults to `"sketch"`): `"sketch"` or `"exact"`.
        sketch_oversampling (`int`, defaults to 64): rows of the gradient sketch beyond `r`.
        principal_solver (`str`, defaults to `"gram"`): `"gram"` or `"svd"`.
        principal_side (`str`, defaults to `"right"`): `"right"` or `"left"` (square targets only).
        memory_solver (`str`, defaults to `"randomized"`): `"randomized"` or `"eigh"`.
        state_dtype (`str`, defaults to `"auto"`): dtype of the stored bases (float32 on float32/64 bases, float16
            on bf16/fp16/quantized ones).
        finished_tasks (`str`, defaults to `"auto"`): `"auto"`, `"branch"` or `"merge"`.
        keep_principal_basis (`bool`, defaults to `False`): keep the principal basis beside its complement.

    Each field's `help` metadata says more.
    """

    principal_energy: float = field(
        default=0.6,
        metadata={
            "help": "epsilon_w: the share of a pre-trained weight's spectral energy (sum of squared singular values) "
            "that sets the protected principal subspace: the top singular vectors (see principal_side) whose "
            "cumulative share stays below epsilon_w, at least one (the reference code's count). In [0, 1]; 0 "
            "protects nothing, 1 every direction with energy."
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
    feature_source: Literal["activations", "gradients", "mean_gradient"] = field(
        default="activations",
        metadata={
            "help": "What the feature memory is built from: 'activations', the layer's input activations (the "
            "reference CLIP code); 'mean_gradient', the input side of the task's mean weight gradient at the trained "
            "model, G^T G (the reference LLaVA code), from a co-range sketch of G (`memory_sketch_rows`), never the "
            "d_out x d_in gradient itself; 'gradients', the sum of per-batch gradient covariances (every target's "
            "full gradient held at once)."
        },
    )
    activation_statistic: Literal["second_moment", "position_mean"] = field(
        default="second_moment",
        metadata={
            "help": "Which statistic of the input activations grows the memory (feature_source='activations'): "
            "'second_moment', the uncentred second moment of every input row, sum x x^T; 'position_mean', the "
            "reference CLIP code's: the running mean of the batches' input matrices aligned row by row (a row is one "
            "token position of one batch slot), whose left singular vectors are the memory's candidates. It needs "
            "batches of one shape (a batch of another row count, such as a short last batch, is left out, as the "
            "reference's drop_last does) and holds a rows x d_in matrix per target. Measured side by side in "
            "docs/method.md."
        },
    )
    memory_sketch_rows: int = field(
        default=512,
        metadata={
            "help": "Rows of the co-range sketch Psi G of the mean gradient for feature_source='mean_gradient' (a "
            "positive integer): (rows x d_in) floats per target instead of d_out x d_in; exact once rows >= d_out."
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

    gradient_estimator: Literal["sketch", "exact"] = field(
        default="sketch",
        metadata={
            "help": "How begin_task estimates the residual gradient for A. 'sketch': each target accumulates "
            "Psi @ G (r + sketch_oversampling rows) from its inputs and output gradients through hooks, so no "
            "d_out x d_in gradient is ever formed; the pass costs about one LoRA training step per batch and the "
            "memory of a LoRA step. 'exact': the full weight gradient of every target, held in float32 for all targets "
            "at once (+1x the targets' weights in memory), and a full SVD."
        },
    )
    sketch_oversampling: int = field(
        default=64,
        metadata={
            "help": "Rows of the gradient sketch beyond r (a non-negative integer). More rows capture more of a gradient "
            "with a flat spectrum, at (r + sketch_oversampling) * (d_in + d_out) multiply-adds per token and target; "
            "the sketch is exact once r + sketch_oversampling >= d_out."
        },
    )
    principal_solver: Literal["gram", "svd"] = field(
        default="gram",
        metadata={
            "help": "How the principal subspace of each pre-trained weight is found on the first task. 'gram': "
            "eigendecomposition of the smaller Gram matrix (float32 above 512 rows), several times faster than "
            "'svd': a full float64 SVD (the reference). Both give the same p; the subspaces agree to about 1e-5."
        },
    )
    principal_side: Literal["right", "left"] = field(
        default="right",
        metadata={
            "help": "Which singular vectors of each pre-trained weight W (d_out x d_in) form the principal subspace "
            "that A is kept orthogonal to: 'right', those of W's input space (the reference LLaVA code); 'left', the "
            "left singular vectors, of W's output space, used as input directions (the reference CLIP code's "
            "U[:, :p] of svd(W)). 'left' is only defined for square targets (CLIP's q, k, v, out_proj) and refused "
            "on others. Measured side by side in docs/method.md."
        },
    )
    memory_solver: Literal["randomized", "eigh"] = field(
        default="randomized",
        metadata={
            "help": "How end_task finds the new feature-memory directions. 'randomized': Ritz vectors on a growing "
            "random subspace, with the energy each explains computed exactly, so the feature_energy criterion holds "
            "for what is added; 'eigh': the full eigendecomposition of the residual feature covariance (the reference)."
        },
    )
    state_dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = field(
        default="auto",
        metadata={
            "help": "dtype of the stored bases (principal, memory or its complement), in memory and on disk. Every "
            "computation upcasts to float32 and re-orthonormalises low-precision bases, so A is exactly orthogonal "
            "to the stored subspace; a 16-bit state halves it, at a rotation of the subspace itself of 2.7e-4 "
            "(float16) or 2.2e-3 (bfloat16), measured (benchmarks/state_dtype.py): basis entries lie in [-1, 1], so "
            "float16's longer mantissa wins. 'auto': float32 where the base weight is float32/64 (finished tasks "
            "merge exactly there, so the state keeps that precision), float16 on bfloat16/float16/quantized bases, "
            "whose own rounding of each layer's output is larger than that rotation."
        },
    )

    finished_tasks: Literal["auto", "branch", "merge"] = field(
        default="auto",
        metadata={
            "help": "Where a finished task's update `s * B @ A` lives. 'merge': added into the base weight at end_task "
            "(free at inference, but a bfloat16/float16 weight rounds most of a small update away, and breaks its "
            "orthogonality to the protected subspace); 'branch': kept as a frozen float32 low-rank branch of the layer, "
            "exact on any base dtype, 4-bit included, and `disable_adapter()` gives the pre-trained model, at the cost "
            "of a rank-(tasks x r) product per target and step; 'auto' (the default): 'merge' where the base weight is "
            "float32 or float64 (exact to ~1e-7), 'branch' otherwise. `merge_and_unload()` and `export_lora` fold "
            "branches in whichever is chosen."
        },
    )
    keep_principal_basis: bool = field(
        default=False,
        metadata={
            "help": "Each layer's state stores the narrower of its memory and its residual basis (the complement of "
            "the protected subspace). False (the default) then keeps only min(k, d_in - k) * d_in values per layer, "
            "plus the p energies (squared singular values) of the principal directions: the principal basis is "
            "recomputed from the original weight (base weight minus merged tasks) when inspected, which the training "
            "path never does, and the hub's base-model check compares the energies with the base weight's spectrum. "
            "True also keeps the principal basis (p * d_in more values once the complement is stored)."
        },
    )

    def __post_init__(self) -> None:
        check_ranks_and_alphas(self)
        if self.init_lora_weights is not True:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by KeepLoRA: begin_task chooses A from "
                "the task's residual gradient and starts B at zero, so another initialisation would be overwritten "
                "(False, 'gaussian') or would rewrite the base weights the protected subspace is computed from (PiSSA, "
                "OLoRA, CorDA, EVA, LoftQ). Use True; lora_A_init picks how A is chosen."
            )
        if self.bias != "none":
            raise ValueError(
                f"bias={self.bias!r} is not supported by KeepLoRA: trained biases would change the model outside the "
                "protected-subspace guarantee. Use 'none'."
            )
        refuse_unverified_fields(self, KeepLoRAConfig.__annotations__)
        super().__post_init__()
        self.peft_type = KEEPLORA_PEFT_TYPE
        _check_range("principal_energy", self.principal_energy, 0.0, 1.0, "[0, 1]", low_open=False)
        _check_range("feature_energy", self.feature_energy, 0.0, 1.0, "[0, 1]", low_open=False)
        _check_range("layer_scale_gamma", self.layer_scale_gamma, 0.0, 1.0, "(0, 1]", low_open=True)
        _check_range("gradient_data_ratio", self.gradient_data_ratio, 0.0, 1.0, "(0, 1]", low_open=True)
        for name, value, allowed in (
            ("feature_source", self.feature_source, FEATURE_SOURCES),
            ("activation_statistic", self.activation_statistic, ACTIVATION_STATISTICS),
            ("principal_side", self.principal_side, PRINCIPAL_SIDES),
            ("lora_A_init", self.lora_A_init, LORA_A_INITS),
            ("gradient_estimator", self.gradient_estimator, GRADIENT_ESTIMATORS),
            ("principal_solver", self.principal_solver, PRINCIPAL_SOLVERS),
            ("memory_solver", self.memory_solver, MEMORY_SOLVERS),
            ("state_dtype", self.state_dtype, STATE_DTYPES),
            ("finished_tasks", self.finished_tasks, FINISHED_TASKS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.activation_statistic != "second_moment" and self.feature_source != "activations":
            raise ValueError(
                f"activation_statistic={self.activation_statistic!r} is a statistic of the input activations, but "
                f"feature_source={self.feature_source!r} builds the memory from gradients: set "
                "feature_source='activations', or leave activation_statistic at 'second_moment'"
            )
        _check_integer("sketch_oversampling", self.sketch_oversampling, 0)
        _check_integer("memory_sketch_rows", self.memory_sketch_rows, 1)
        for name, value in (("keep_principal_basis", self.keep_principal_basis), ("train_lora_A", self.train_lora_A)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config and, for a local folder, check its weights file against it before PEFT reads the weights:
        a truncated file or a hand-edited `r` is named with the file and the layer (`tuner/adapter_files.py`)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        check_adapter_files(os.path.join(pretrained_model_name_or_path, subfolder or ""), config)
        return config


def state_torch_dtype(config: KeepLoRAConfig, module: nn.Module) -> torch.dtype:
    """The torch dtype of `config.state_dtype` for the target `module` ('auto' follows its base weight)."""
    if config.state_dtype == "auto":
        return torch.float32 if merges_exactly(module) else torch.float16
    return getattr(torch, config.state_dtype)


def _check_integer(name: str, value: object, minimum: int) -> None:
    """`value` must be an integer (a bool is not one) of at least `minimum`, 0 or 1."""
    if not is_integer(value, minimum):
        raise ValueError(f"{name} must be a {'positive' if minimum else 'non-negative'} integer, got {value!r}")


def _check_range(name: str, value: float, low: float, high: float, shown: str, *, low_open: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in {shown}, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        raise ValueError(f"{name} must be in {shown}, got {value}")
