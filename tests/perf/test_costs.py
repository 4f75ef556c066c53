"""What begin_task and end_task cost, counted rather than timed (timings on a shared CPU are noise).

Floating-point operations are counted with `torch.utils.flop_counter.FlopCounterMode`, which sees every matrix
product autograd runs, including those inside the gradient sketch's hooks. Peak memory is a benchmark
(benchmarks/memory.py), not a test: at a size that runs in a test, allocator noise exceeds the target weights.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from keeplora_hf import KeepLoRAConfig, begin_task
from keeplora_hf.tuner.statistics import input_feature_pass

WIDTH, DEPTH, TOKENS = 512, 6, 256


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, 4 * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def loss_fn(model, batch):
    return model(batch["x"]).square().mean()


def _batches(count=3):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(TOKENS, WIDTH, generator=g)} for _ in range(count)]


def _keeplora(**overrides):
    config = dict(r=8, lora_alpha=8, target_modules=r"layers\.\d+", principal_energy=0.3, gradient_data_ratio=1.0)
    config.update(overrides)
    return get_peft_model(Stack(), KeepLoRAConfig(**config))


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _lora_step_flops() -> int:
    model = get_peft_model(Stack(), LoraConfig(r=8, lora_alpha=8, target_modules=r"layers\.\d+"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    batch = _batches(1)[0]

    def step():
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()

    return _flops(step)


def test_sketched_gradient_pass_costs_a_training_step_and_the_exact_one_more():
    batches = _batches()
    step = _lora_step_flops()
    costs = {}
    for estimator in ("sketch", "exact"):
        model = _keeplora(gradient_estimator=estimator, principal_energy=0.0)  # no SVD: count the pass alone
        costs[estimator] = _flops(lambda: begin_task(model, batches, loss_fn=loss_fn)) / len(batches)
    # per batch: forward + input gradients, plus the sketch's (r + 64) * (d_in + d_out) per token and target
    sketch_extra = 2 * TOKENS * DEPTH * (8 + 64) * 2 * WIDTH
    assert costs["sketch"] <= step + sketch_extra
    # the exact path also forms every d_out x d_in weight gradient: 2 * tokens * d_in * d_out more per target
    assert costs["exact"] >= costs["sketch"] + 0.9 * (2 * TOKENS * DEPTH * WIDTH * WIDTH - sketch_extra)


def test_feature_pass_stops_before_the_head():
    """After the first batch, a batch's forward ends at the last target: the head (here 2x the stack) never runs."""
    model = _keeplora()
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "keeplora_state")}
    batches = _batches()
    spent = {
        stop: _flops(lambda stop=stop: input_feature_pass(model, layers, batches, loss_fn, lambda names, x: None,
                                                          description="", stop_early=stop))
        for stop in (False, True)
    }
    head = 2 * TOKENS * WIDTH * 4 * WIDTH
    last_target = 2 * TOKENS * WIDTH * WIDTH + 2 * 2 * TOKENS * WIDTH * 8  # its input is recorded, then we stop
    assert spent[False] - spent[True] == (len(batches) - 1) * (head + last_target)
