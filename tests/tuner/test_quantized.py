"""KeepLoRA++ on a 4-bit (bitsandbytes NF4) base, as QLoRA users load it: nothing is written into quantized weights.

bitsandbytes quantizes on this CPU, but its CPU kernels need layers at least 64 wide, so the test uses the shipped
demo model's shapes (language model 128 wide), with the language model quantized and the vision tower kept.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from keeplora_hf import KeepLoRAConfig, begin_task, end_task, learned_update, protected_basis
from keeplora_hf.models.demo import DEMO_LANGUAGE_TARGETS, build_demo_model
from keeplora_hf.subspace import principal_basis
from keeplora_hf.tuner.weights import base_weight

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def _quantized_demo(path):
    build_demo_model(0).save_pretrained(path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
    )
    return transformers.LlavaForConditionalGeneration.from_pretrained(
        path, quantization_config=quantization, device_map="cpu"
    )


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(5, 120, (2, 12), generator=g)  # text only, below the image token id
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def test_a_4bit_base_learns_two_tasks_with_the_guarantee_through_the_branch(tmp_path):
    model = get_peft_model(
        _quantized_demo(tmp_path / "base"),
        KeepLoRAConfig(r=4, lora_alpha=8, target_modules=DEMO_LANGUAGE_TARGETS, gradient_data_ratio=1.0),
    )
    targets = {n: m for n, m in model.named_modules() if hasattr(m, "keeplora_state")}
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in targets.values())
    dequantized = {n: base_weight(m).clone() for n, m in list(targets.items())[:1]}
    batches = _batches()
    for t, task in enumerate((batches[:2], batches[1:])):
        begin_task(model, task)
        protected = {n: protected_basis(model, n).float() for n in targets}
        if t == 0:  # the principal basis is that of the dequantized weight
            name = next(iter(targets))
            expected = principal_basis(dequantized[name], 0.6, solver="gram")
            assert protected[name].shape == expected.shape
            overlap = torch.linalg.svdvals(protected[name].double().T @ expected.double())
            assert overlap.min() > 1 - 1e-3  # stored in float16 on a quantized base: a rotation of ~2.7e-4
        before = {n: learned_update(model, n) for n in targets}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        for step in range(3):
            model(**task[step % 2]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        end_task(model, task)
        for name, module in targets.items():
            update = learned_update(model, name) - before[name]
            assert update.norm() > 0, name
            assert (update @ protected[name]).norm() <= 1e-4 * update.norm(), name
            state = module.keeplora_state["default"]
            assert state.merged_tasks == 0 and len(state.tasks) == t + 1  # nothing written into the 4-bit weight


def test_merge_into_a_4bit_weight_is_refused_before_anything_changes(tmp_path):
    model = get_peft_model(
        _quantized_demo(tmp_path / "base"),
        KeepLoRAConfig(r=4, lora_alpha=8, target_modules=DEMO_LANGUAGE_TARGETS, finished_tasks="merge"),
    )
    batches = _batches()
    begin_task(model, batches)
    with pytest.raises(ValueError, match="quantized base weight"):
        end_task(model, batches)
    assert model.base_model.progress("default").in_task  # the task is still under way, nothing was finished
