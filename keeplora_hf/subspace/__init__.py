"""Linear algebra of KeepLoRA++, free of transformers and peft: bases are `(d_in, k)` with orthonormal columns."""

from .basis import Subspace, orthogonal_complement, orthonormalize
from .memory import (
    MEMORY_SOLVERS,
    FeatureStatistics,
    MemoryGrowth,
    ResidualCovariance,
    ResidualStatistics,
    extend_memory,
    grow_memory,
    memory_directions,
)
from .position_mean import PositionMeanStatistics
from .principal import (
    PRINCIPAL_SIDES,
    PRINCIPAL_SOLVERS,
    energy_rank,
    principal_basis,
    principal_rank,
    principal_source,
    ritz_energies,
    squared_singular_values,
)
from .residual import complete_rows, project_out, residual_directions, rows_in_residual
from .sketch import GradientSketch, sketch_rows

__all__ = [
    "MEMORY_SOLVERS",
    "PRINCIPAL_SIDES",
    "PRINCIPAL_SOLVERS",
    "FeatureStatistics",
    "GradientSketch",
    "MemoryGrowth",
    "PositionMeanStatistics",
    "ResidualCovariance",
    "ResidualStatistics",
    "Subspace",
    "complete_rows",
    "energy_rank",
    "extend_memory",
    "grow_memory",
    "memory_directions",
    "orthogonal_complement",
    "orthonormalize",
    "principal_basis",
    "principal_rank",
    "principal_source",
    "project_out",
    "residual_directions",
    "ritz_energies",
    "rows_in_residual",
    "sketch_rows",
    "squared_singular_values",
]
