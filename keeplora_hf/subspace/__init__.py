"""Linear algebra of KeepLoRA++, free of transformers and peft: bases are `(d_in, k)` with orthonormal columns."""

from .memory import FeatureStatistics, extend_memory
from .principal import energy_rank, principal_basis
from .residual import project_out, residual_directions

__all__ = [
    "FeatureStatistics",
    "energy_rank",
    "extend_memory",
    "principal_basis",
    "project_out",
    "residual_directions",
]
