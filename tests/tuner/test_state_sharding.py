"""The pieces of a KeepLoRA state sharded by layer that one process can check: who owns which layer, and what a rank
that does not own a layer keeps of its state (shapes only) and refuses to do with it. The collectives themselves run
in tests/continual/test_fsdp2.py and test_deepspeed.py (two processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keeplora_hf import begin_task, end_task, protected_basis
from keeplora_hf.tuner.layer import layer_state
from keeplora_hf.tuner.state_sharding import balanced_owners, state_owners

from keeplora_setups import learn, targets, wrap


class _Layer(nn.Module):
    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, 2)

    def get_base_layer(self) -> nn.Linear:
        return self.base


def test_layers_are_dealt_to_the_least_loaded_rank_by_d_in_squared():
    layers = {name: _Layer(d_in) for name, d_in in [("a", 8), ("b", 4), ("c", 4), ("d", 4), ("e", 4), ("f", 8)]}
    # loads after each: a->0 (64, 0), b->1 (64, 16), c->1 (64, 32), d->1 (64, 48), e->1 (64, 64), f->0 (128, 64)
    assert balanced_owners(layers, 2) == {"a": 0, "b": 1, "c": 1, "d": 1, "e": 1, "f": 0}
    assert balanced_owners(layers, 1) == dict.fromkeys(layers, 0)
    three = balanced_owners(layers, 3)
    assert set(three.values()) == {0, 1, 2} and three == balanced_owners(layers, 3)  # every rank derives the same


def test_one_process_keeps_the_whole_state(device):
    model, batches, _ = wrap("llava", device=device)
    begin_task(model, batches)
    layers = targets(model)
    assert state_owners(model, layers) is None
    assert all(layer_state(module, "default").held for module in layers.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_released_state_keeps_its_shapes_and_refuses_to_compute(device, dtype):
    model, batches, _ = wrap("llava", device=device, dtype=dtype)
    begin_task(model, batches)
    learn(model, batches)
    end_task(model, batches)  # a memory next to the principal basis
    name, module = next(iter(targets(model).items()))
    state = layer_state(module, "default")
    layout = state.layout()
    ranks = (state.d_in, state.principal_rank, state.memory_rank, state.stored_values())
    tasks = [(t.lora_A.clone(), t.lora_B.clone()) for t in state.tasks]

    state.release_bases_()
    assert not state.held and state.initialised
    assert state.layout() == layout
    assert (state.d_in, state.principal_rank, state.memory_rank, state.stored_values()) == ranks
    assert all(torch.equal(a, t.lora_A) and torch.equal(b, t.lora_B) for (a, b), t in zip(tasks, state.tasks))
    state.to(device)  # follows the model to a device without touching the bases it does not hold
    assert not state.held
    for read in (state.subspace, state.protected, lambda: protected_basis(model, name)):
        with pytest.raises(RuntimeError, match="does not hold the protected bases of this layer"):
            read()
    with pytest.raises(RuntimeError, match="does not hold the protected bases"):
        state.add_memory(torch.zeros(state.d_in, 1, device=device), torch.float32)
    assert state.layout() == layout  # the refusals changed nothing
