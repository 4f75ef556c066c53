"""From the second task on, a target whose protected subspace is stored by its complement `R` gathers its feature
statistic in `R`'s coordinates (`ResidualStatistics` in the activations pass, `(X R)^T (X R)` of the gradient sketch):
the memory it grows is the one the whole `d_in x d_in` statistic grows."""

from __future__ import annotations

import pytest
import torch

import keeplora_hf.tuner.feature_memory as feature_memory
import keeplora_hf.tuner.lifecycle as lifecycle
from keeplora_hf import begin_task, end_task
from keeplora_hf.subspace import ResidualCovariance, grow_memory
from keeplora_hf.tuner.layer import layer_state

from keeplora_setups import learn, targets, wrap

_TASKS = ((0, 1), (1, 2), (2, 0))


def _run(feature_source: str, dtype: torch.dtype, device: str, projected: bool, monkeypatch) -> tuple[list[dict], int]:
    """Three tasks; the number of memory solves that took a statistic gathered in coordinates."""
    solves = []

    def counting_grow_memory(covariance, *args, **kwargs):
        solves.append(isinstance(covariance, ResidualCovariance))
        return grow_memory(covariance, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(lifecycle, "grow_memory", counting_grow_memory)
        if not projected:
            patch.setattr(feature_memory, "_complements", lambda ctx, names: {})
        torch.manual_seed(0)
        model, batches, _ = wrap("llava", dtype=dtype, device=device, feature_source=feature_source)
        states = []
        for picks in _TASKS:
            task = [batches[i] for i in picks]
            begin_task(model, task)
            learn(model, task)
            end_task(model, task)
            states.append({
                name: (s.memory_rank, None if s.complement is None else s.complement.double().cpu())
                for name, s in ((n, layer_state(m, "default")) for n, m in targets(model).items())
            })
    return states, sum(solves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feature_source", ["activations", "mean_gradient"])
def test_statistics_in_the_complement_coordinates_grow_the_memory_the_whole_statistic_grows(
    feature_source, dtype, device, monkeypatch
):
    fast, used = _run(feature_source, dtype, device, True, monkeypatch)
    whole, unused = _run(feature_source, dtype, device, False, monkeypatch)
    assert used > 0 and unused == 0  # the second and third tasks gathered some targets' statistics in coordinates
    # float32 bases: the float32 rounding of the two ways of forming R^T C R; a bfloat16 base keeps its bases in
    # float16 (state_dtype="auto"), whose rounding the second way meets once more (docs/performance.md)
    bound = 1e-4 if dtype == torch.float32 else 2e-3
    compared = 0
    for name, (rank, complement) in fast[1].items():  # the first end_task that gathered in coordinates
        other_rank, other = whole[1][name]
        assert rank == other_rank, (name, rank, other_rank)
        if complement is not None:
            gap = torch.linalg.matrix_norm(complement @ complement.T - other @ other.T, ord=2)
            assert gap < bound, (name, float(gap))
            compared += 1
    assert compared > 0
    # a task later, the two runs have trained from those slightly different states: the same memory ranks, within one
    assert all(abs(rank - whole[2][name][0]) <= 1 for name, (rank, _) in fast[2].items())
