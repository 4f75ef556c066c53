"""What a server computes from an export: the exported LoRA applied the way vLLM's and SGLang's loaders apply it
(`keeplora_hf.serving_check`: only `r`, `lora_alpha`, `target_modules`, `use_rslora` read), against the KeepLoRA++
model, on every tiny VLM with its vision tower targeted, two tasks, the default layer scaling (gamma 0.2).

Side by side in one run: the serving export of `export_lora` and the layout it wrote before (per-layer scales in
`alpha_pattern`, per-layer ranks in `rank_pattern`, which those loaders drop), rebuilt here from the same updates.
The figure is the largest logit gap over the largest change the tasks made to the logits (0: the server computes the
model; 1: as far off as everything learned).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from keeplora_hf import KeepLoRAConfig, begin_task, end_task, export_lora
from keeplora_hf.merged_checkpoint import layer_updates
from keeplora_hf.models import TINY_MODELS, build_tiny
from keeplora_hf.serving_check import apply_like_a_server
from keeplora_hf.tuner.model import keeplora_layers, tuner_of
from measure import configure_threads, write_result

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pattern_export(model: torch.nn.Module, folder: Path) -> None:
    """The layout `export_lora` wrote before the serving export: the layer scale in `alpha_pattern`, its rank in
    `rank_pattern` (so only a loader that reads both reproduces the model)."""
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    tensors, ranks, alphas = {}, {}, {}
    for name, module in keeplora_layers(tuner.model, adapter).items():
        updates = layer_updates(module, adapter)
        reference = updates[0].scaling
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat([u.lora_A for u in updates]).contiguous()
        lora_B = torch.cat([u.lora_B * (u.scaling / reference) for u in updates], 1).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B
        ranks[re.escape(name)] = lora_B.shape[1]
        alphas[re.escape(name)] = reference * lora_B.shape[1]
    config = tuner.peft_config[adapter]
    plain = LoraConfig(r=max(ranks.values()), lora_alpha=config.lora_alpha, target_modules=sorted(ranks),
                       rank_pattern=ranks, alpha_pattern=alphas)
    plain.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def measure(name: str, dtype: torch.dtype, steps: int) -> dict[str, float]:
    tiny = build_tiny(name)
    targets = f"({tiny.language_targets})|({tiny.vision_targets})" if tiny.vision_targets else tiny.language_targets
    base = tiny.model.to(dtype)
    batches = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny.make_batch(2, s).items()} for s in range(3)]
    with torch.no_grad():
        pretrained = base(**batches[0]).logits.float()
    model = get_peft_model(base, KeepLoRAConfig(r=4, lora_alpha=8, target_modules=targets, gradient_data_ratio=1.0))
    for task in ([batches[0], batches[1]], [batches[1], batches[2]]):
        begin_task(model, task)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        for step in range(steps):
            model(**task[step % 2]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        end_task(model, task)
    with torch.no_grad():
        expected = model(**batches[0]).logits.float()
    learned = (expected - pretrained).abs().max().item()
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        for layout, write in (("serving", lambda m, f: export_lora(m, f)), ("patterns", pattern_export)):
            folder = Path(scratch) / layout
            folder.mkdir()
            write(model, folder)
            served = apply_like_a_server(build_tiny(name).model.to(dtype), folder)
            with torch.no_grad():
                found = served(**batches[0]).logits.float()
            figures[layout] = (found - expected).abs().max().item() / learned
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="AdamW steps per task")
    args = parser.parse_args()
    configure_threads()
    rows = []
    for name in [n for n in TINY_MODELS if n != "clip"]:
        for dtype_name, dtype in DTYPES.items():
            figures = measure(name, dtype, args.steps)
            rows.append({"model": name, "dtype": dtype_name, **figures})
            print(f"{name:18s} {dtype_name:9s} serving {figures['serving']:.2e}  patterns {figures['patterns']:.3f}")
    write_result("serving_export", {"metric": "max logit gap / max learned logit change", "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
