"""`keeplora-hf pretrain-clip`: give the demo CLIP general knowledge to keep, reproducibly from one seed.

Pre-training is classification of each general skill against its class prompts (`class_prompt`: "<question>
<answer>"), one skill per batch, skills in turn: CLIP's own contrastive loss would treat two images of one class in
a batch as negatives, and scoring every class prompt is how the model classifies at test time.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..continual.checkpoint import atomic_directory
from ..data.collators import ClipCollator
from ..data.synthetic.classification import CLIP_GENERAL_SKILLS, class_prompt, clip_general_samples, skill_spec
from .demo_clip import build_demo_clip, build_demo_clip_processor

logger = logging.getLogger(__name__)


@dataclass
class ClipPretrainSettings:
    """Everything that decides the pre-trained weights; with the same values the run is repeatable."""

    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 1e-3
    corpus_size: int = 6000  # samples over all skills
    eval_size: int = 400
    seed: int = 0


def _skill_tensors(processor, skill: str, split: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """`n` samples of `skill` as one batch: pixels, labels and the skill's class prompts."""
    answers = list(skill_spec(skill).answers)
    rows = [{"image": s.image, "label": answers.index(s.answer)} for s in clip_general_samples(skill, split, n, seed)]
    return ClipCollator(processor, answers, class_prompt(skill))(rows)


@torch.no_grad()
def skill_accuracies(model: torch.nn.Module, data: dict[str, dict[str, torch.Tensor]], batch_size: int = 256) -> dict[str, float]:
    """Zero-shot accuracy of each skill: every image against all its skill's class prompts."""
    model.eval()
    accuracies = {}
    for skill, tensors in data.items():
        correct = 0
        for start in range(0, len(tensors["labels"]), batch_size):
            logits = model(pixel_values=tensors["pixel_values"][start : start + batch_size],
                           input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits_per_image
            correct += int((logits.argmax(-1) == tensors["labels"][start : start + batch_size]).sum())
        accuracies[skill] = correct / len(tensors["labels"])
    return accuracies


def pretrain_clip(output_dir: str | Path, settings: ClipPretrainSettings = ClipPretrainSettings()) -> dict[str, Any]:
    """Train the demo CLIP from scratch on the general skills and save it (float16) with its processor.

    The directory appears whole or not at all, so an interrupted pre-training never leaves a half checkpoint.
    """
    output_dir = Path(output_dir)
    processor = build_demo_clip_processor()
    model = build_demo_clip(settings.seed)
    per_skill = settings.corpus_size // len(CLIP_GENERAL_SKILLS)
    corpus = {s: _skill_tensors(processor, s, "train", per_skill, settings.seed) for s in CLIP_GENERAL_SKILLS}
    suite = {s: _skill_tensors(processor, s, "eval", settings.eval_size // len(CLIP_GENERAL_SKILLS),
                               settings.seed) for s in CLIP_GENERAL_SKILLS}
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    warmup = max(1, settings.steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))
    generator = torch.Generator().manual_seed(settings.seed)
    start = time.perf_counter()
    model.train()
    for step in (bar := tqdm(range(settings.steps), desc="pre-training the demo CLIP")):
        data = corpus[CLIP_GENERAL_SKILLS[step % len(CLIP_GENERAL_SKILLS)]]
        rows = torch.randint(len(data["labels"]), (settings.batch_size,), generator=generator)
        logits = model(pixel_values=data["pixel_values"][rows], input_ids=data["input_ids"],
                       attention_mask=data["attention_mask"]).logits_per_image
        loss = F.cross_entropy(logits, data["labels"][rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    accuracies = skill_accuracies(model, suite)
    with atomic_directory(output_dir) as staging:
        model.to(torch.float16).save_pretrained(staging)
        processor.save_pretrained(staging)
        report = {"settings": asdict(settings), "train_seconds": round(seconds, 1), "general_skills": accuracies}
        (staging / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("pre-trained demo CLIP written to %s: %s", output_dir, accuracies)
    return report
