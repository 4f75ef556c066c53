"""What `keeplora-hf analyze` writes, and the eval sets it builds for the demo."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from keeplora_hf.analysis import analyze, precollated_eval_set
from keeplora_hf.analysis.report import PLOTS, markdown_summary, write_analysis
from keeplora_hf.continual.evaluation import answer_exact_match
from keeplora_hf.data.collators import VLMChatCollator
from keeplora_hf.data.synthetic.tasks import make_task
from keeplora_hf.models.demo import build_demo_model, build_demo_processor
from keeplora_hf.models.pretrain import chat_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def results(tiny, tiny_sets):
    return analyze(tiny.model, tiny_sets, tiny.language_targets, energies=(0.5, 0.9, 1.0))


def test_write_analysis_writes_json_plots_and_summary(results, tmp_path):
    paths = write_analysis(results, tmp_path / "out")
    names = {p.name for p in paths}
    assert names == {*PLOTS, "summary.md", "analysis.json"}
    for plot in PLOTS:
        assert (tmp_path / "out" / plot).read_bytes()[:8] == PNG_SIGNATURE
    payload = _strict((tmp_path / "out" / "analysis.json").read_text())
    assert payload["recommendation"]["eps_w"]["value"] == results["recommendation"]["eps_w"]["value"]
    assert set(payload["intra_layer"]["principal"]) == {"0.5", "0.9", "1"}
    assert not list((tmp_path / "out").glob(".*"))  # no staging leftovers


def test_markdown_summary_has_the_recommendation_and_every_table(results):
    text = markdown_summary(results)
    assert results["recommendation"]["text"] in text
    for heading in ("## Recommendation", "## Unchanged model", "## Intra-layer", "## Inter-layer", "## Rank kept"):
        assert heading in text
    assert "| principal ε=0.5 |" in text and "| residual ε=1 |" in text


class _Oracle(torch.nn.Module):
    """Predicts every next token right, except in rows whose token ids sum to an odd number."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        following = torch.roll(input_ids, -1, dims=1)
        wrong = (input_ids.sum(dim=1) % 2 == 1)[:, None]
        following = torch.where(wrong, (following + 1) % 256, following)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(following, 256).float())


def test_precollated_eval_set_gives_the_runners_exact_match():
    collator = VLMChatCollator(build_demo_processor(), max_length=128, model_family="llava")
    rows = chat_rows(make_task("red_side", "eval", 10))
    ready = precollated_eval_set(rows, collator, chance=0.5, batch_size=4)
    assert ready.samples() == 10 and len(ready.dataset) == 3 and ready.chance == 0.5
    runner_metric = answer_exact_match(collator, batch_size=4)
    oracle = _Oracle()
    accuracy = ready.metric(oracle, ready.dataset)
    assert accuracy == runner_metric(oracle, rows) and 0.0 < accuracy < 1.0
    model = build_demo_model(seed=1)
    assert ready.metric(model, ready.dataset) == runner_metric(model, rows)
