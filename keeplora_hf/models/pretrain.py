"""`keeplora-hf pretrain`: give the demo model real general knowledge to keep, reproducibly from one seed."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..continual.checkpoint import atomic_directory
from ..continual.evaluation import answer_exact_match
from ..data.collators import VLMChatCollator
from ..data.synthetic.tasks import Sample, general_corpus, general_eval_suite
from .demo import build_demo_model, build_demo_processor

logger = logging.getLogger(__name__)

MAX_LENGTH = 128


@dataclass
class PretrainSettings:
    """Everything that decides the pre-trained weights; with the same values the run is repeatable."""

    steps: int = 2500
    batch_size: int = 48
    learning_rate: float = 1e-3
    corpus_size: int = 24000
    eval_size: int = 500
    seed: int = 0


def chat_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    """Samples as the collators' chat rows: one image, one question, one single-word answer."""
    return [
        {
            "images": [s.image],
            "messages": [
                {"role": "user", "content": f"<image>\n{s.question}"},
                {"role": "assistant", "content": s.answer},
            ],
        }
        for s in samples
    ]


def skill_accuracies(model: torch.nn.Module, collator: VLMChatCollator, samples: list[Sample]) -> dict[str, float]:
    metric = answer_exact_match(collator, batch_size=64)
    skills = sorted({s.skill for s in samples})
    return {skill: metric(model, chat_rows([s for s in samples if s.skill == skill])) for skill in skills}


def pretrain(output_dir: str | Path, settings: PretrainSettings = PretrainSettings()) -> dict[str, Any]:
    """Train the demo model from scratch on the general corpus and save it (float16) with its processor.

    The directory appears whole or not at all, so an interrupted pre-training never leaves a half checkpoint that
    the demo would load.
    """
    output_dir = Path(output_dir)
    processor = build_demo_processor()
    model = build_demo_model(settings.seed)
    collator = VLMChatCollator(processor, max_length=MAX_LENGTH, model_family="llava")
    corpus = chat_rows(general_corpus(settings.corpus_size, seed=settings.seed))
    suite = general_eval_suite(settings.eval_size, seed=settings.seed)
    with atomic_directory(output_dir) as staging:
        args = TrainingArguments(
            output_dir=str(staging / "trainer"),
            max_steps=settings.steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, settings.steps // 30),
            weight_decay=0.01,
            logging_steps=max(1, settings.steps // 30),
            save_strategy="no",
            report_to=[],
            seed=settings.seed,
            use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False,
            dataloader_drop_last=True,
        )
        start = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=corpus, data_collator=collator).train()
        seconds = time.perf_counter() - start
        accuracies = skill_accuracies(model, collator, suite)
        model.to(torch.float16).save_pretrained(staging)
        processor.save_pretrained(staging)
        report = {"settings": settings.__dict__, "train_seconds": round(seconds, 1), "general_suite": accuracies}
        (staging / "pretrain.json").write_text(json.dumps(report, indent=2))
        shutil.rmtree(staging / "trainer", ignore_errors=True)
    logger.info("pre-trained demo model written to %s: %s", output_dir, accuracies)
    return report
