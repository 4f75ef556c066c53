"""Report outputs: valid PNGs, markdown and terminal tables with the numbers, strict JSON, atomic writes."""

from __future__ import annotations

import json
import math

import matplotlib.image
import numpy as np
import pytest

from keeplora_hf.continual import checkpoint, report
from keeplora_hf.continual.metrics import compute_all

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results() -> dict:
    keeplora = [[0.50, 0.40], [0.90, None], [0.85, 0.95]]  # task 2 not evaluated after task 1
    general = {"general_suite": [0.90, 0.88, 0.87]}
    return {
        "tasks": ["t1", "t2"],
        "methods": {
            "keeplora++": {
                "accuracy_matrix": keeplora,
                "general": general,
                "metrics": compute_all(keeplora, general),  # NaN where undefined (transfer, fwt)
                "timings_s": {"train": 12.5, "task_boundary": 0.25, "eval": 3.0},
            },
            "lora/baseline": {"accuracy_matrix": [[0.50, 0.40], [0.92, 0.30], [0.40, 0.96]]},  # metrics computed
        },
        "config": {"rank": 8},
        "seed": 0,
        "versions": {"torch": "2.x"},
    }


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_write_report_writes_every_file(results, tmp_path):
    out = tmp_path / "out"
    paths = report.write_report(results, out)
    assert [p.name for p in paths] == [
        "results.json",
        "heatmap_keeplora++.png", "accuracy_over_time_keeplora++.png",
        "heatmap_lora_baseline.png", "accuracy_over_time_lora_baseline.png",  # '/' cannot be in a file name
        "report.md",
    ]
    for path in paths:
        assert path.parent == out and path.is_file()
    for path in paths[1:-1]:
        assert_png(path)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temporary files left
    assert (out / "report.md").read_text() == report.markdown_report(results)


def test_results_json_round_trips_with_null(results, tmp_path):
    report.write_report(results, tmp_path)
    text = (tmp_path / "results.json").read_text()

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    loaded = json.loads(text, parse_constant=reject)
    method = loaded["methods"]["keeplora++"]
    assert method["accuracy_matrix"][1][1] is None
    assert method["metrics"]["transfer"] is None and method["metrics"]["fwt"] is None
    assert method["metrics"]["last"] == pytest.approx(0.9)  # (0.85 + 0.95) / 2
    assert loaded == report.to_jsonable(results)
    assert report.to_jsonable(loaded) == loaded


def test_to_jsonable_converts_numpy_and_non_finite():
    value = {"a": np.array([0.5, np.nan]), "b": (np.float32(0.25), np.int64(3), math.inf), 1: np.bool_(True)}
    assert report.to_jsonable(value) == {"a": [0.5, None], "b": [0.25, 3, None], "1": True}


def test_markdown_has_the_numbers(results):
    text = report.markdown_report(results)
    assert "## keeplora++" in text and "## lora/baseline" in text and "## Comparison" in text
    assert "| zero-shot | 50.0 | 40.0 | 90.0 |" in text  # general set as an extra column
    assert "| after t1 | 90.0 | – | 88.0 |" in text  # not evaluated renders as an en dash
    assert "| after t2 | 85.0 | 95.0 | 87.0 |" in text
    assert "general:general_suite" in text
    # keeplora++: last (0.85+0.95)/2 = 90.0; mft (0.9+0.95)/2 = 92.5; bwt 0.85-0.9 = -5.0; transfer undefined;
    # retention 0.87/0.90 = 96.7
    assert "| last | 90.0 |" in text and "| mft | 92.5 |" in text and "| bwt | -5.0 |" in text
    assert "| transfer | – |" in text and "| general_retention | 96.7 |" in text
    # comparison rows, METRIC_NAMES order: transfer avg last mft mfn maa bwt fwt forgetting general_retention
    # keeplora++: avg (0.9+0.85+0.95)/3 = 90.0; maa (0.9 + 0.9)/2 = 90.0; forgetting 0.9-0.85 = 5.0
    assert "| keeplora++ | – | 90.0 | 90.0 | 92.5 | 90.0 | 90.0 | -5.0 | – | 5.0 | 96.7 |" in text
    # lora/baseline, computed: transfer 30.0; avg (0.92+0.3+0.4+0.96)/4 = 64.5; last 68.0; mft 94.0; maa
    # (0.92 + 0.68)/2 = 80.0; bwt 0.4-0.92 = -52.0; fwt 0.3-0.4 = -10.0; forgetting 52.0; no general sets
    assert "| lora/baseline | 30.0 | 64.5 | 68.0 | 94.0 | 68.0 | 80.0 | -52.0 | -10.0 | 52.0 | – |" in text
    assert "![keeplora++ accuracy matrix](heatmap_keeplora++.png)" in text
    assert "Time (s): train 12.5, task boundary 0.2, eval 3.0" in text


def test_terminal_summary_is_aligned(results):
    text = report.terminal_summary(results)
    lines = text.splitlines()
    table = lines[1:12]  # header + one line per metric
    assert table[0].split() == ["metric", "keeplora++", "lora/baseline"]
    assert table[3].split() == ["last", "90.0", "68.0"]
    assert table[1].split() == ["transfer", "-", "30.0"]  # ASCII for undefined
    assert len({len(line) for line in table}) == 1  # fixed width
    assert "keeplora++: accuracy matrix (%)" in text
    assert any(line.split() == ["after", "t1", "90.0", "-", "88.0"] for line in lines)
    text.encode("ascii")  # printable on any console


def test_plots_alone(results, tmp_path):
    method = results["methods"]["keeplora++"]
    heatmap = report.save_heatmap(method["accuracy_matrix"], results["tasks"], tmp_path / "h.png", "title")
    curve = report.save_accuracy_over_time(method["accuracy_matrix"], results["tasks"], tmp_path / "c.png")
    assert_png(heatmap)
    assert_png(curve)


def test_invalid_inputs_write_nothing(results, tmp_path):
    with pytest.raises(ValueError, match="3 task names for an accuracy matrix of 2 tasks"):
        report.save_heatmap([[0.5, 0.5]] * 3, ["a", "b", "c"], tmp_path / "h.png", "t")
    with pytest.raises(ValueError, match="needs one value per matrix row"):
        report.save_accuracy_over_time([[0.5]] * 2, ["a"], tmp_path / "c.png", {"g": [0.5]})
    results["methods"]["lora/baseline"]["accuracy_matrix"] = [[50.0, 40.0], [92.0, 30.0], [40.0, 96.0]]
    with pytest.raises(ValueError, match="percentages must be divided by 100"):
        report.write_report(results, tmp_path / "out")
    results["methods"]["lora/baseline"]["accuracy_matrix"] = [[0.5, 0.4], [0.9, 0.3], [0.4, 0.9]]
    results["methods"]["lora_baseline"] = results["methods"]["lora/baseline"]
    with pytest.raises(ValueError, match="same plot file names"):
        report.write_report(results, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
