"""Every metric against matrices worked out by hand, input validation, and the offline `evaluate` module."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keeplora_hf.continual import metrics
from keeplora_hf.continual.metrics import compute_all

NAN = math.nan

# Three tasks. Rows: 0 = zero-shot, t = after task t; columns: task 1, 2, 3.
R3 = [
    [0.50, 0.40, 0.30],
    [0.90, 0.50, 0.20],
    [0.95, 0.80, 0.40],
    [0.70, 0.60, 0.90],
]
R3_EXPECTED = {
    # task 2: rows 1..1 -> 0.5; task 3: rows 1..2 -> (0.2 + 0.4) / 2 = 0.3; mean (0.5 + 0.3) / 2
    "transfer": 0.4,
    # rows 1..3: (0.9+0.5+0.2 + 0.95+0.8+0.4 + 0.7+0.6+0.9) / 9 = 5.95 / 9
    "avg": 5.95 / 9,
    # (0.7 + 0.6 + 0.9) / 3
    "last": 2.2 / 3,
    # diagonal (0.9 + 0.8 + 0.9) / 3
    "mft": 2.6 / 3,
    "mfn": 2.2 / 3,
    # t=1: 0.9; t=2: (0.95 + 0.8) / 2 = 0.875; t=3: 2.2 / 3; mean of the three
    "maa": (0.9 + 0.875 + 2.2 / 3) / 3,
    # i=1: 0.7 - 0.9 = -0.2; i=2: 0.6 - 0.8 = -0.2
    "bwt": -0.2,
    # i=2: R[1,2] - R[0,2] = 0.5 - 0.4 = 0.1; i=3: R[2,3] - R[0,3] = 0.4 - 0.3 = 0.1
    "fwt": 0.1,
    # j=1: max(0.9, 0.95) - 0.7 = 0.25; j=2: max(0.8) - 0.6 = 0.2; mean 0.225 (not -bwt: the best row is row 2)
    "forgetting": 0.225,
    "general_retention": NAN,
}


def assert_metrics(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(metrics.METRIC_NAMES)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[name]), name
        else:
            assert actual[name] == pytest.approx(value), name


def test_three_tasks_by_hand():
    assert_metrics(compute_all(np.array(R3)), R3_EXPECTED)


@pytest.mark.parametrize("name", [n for n in metrics.METRIC_NAMES if n != "general_retention"])
def test_each_function_matches_compute_all(name):
    value = getattr(metrics, name)(R3)
    assert isinstance(value, float)
    assert value == pytest.approx(R3_EXPECTED[name])


def test_one_task():
    # zero-shot 0.3, after the task 0.8: nothing comes before or after the single task
    got = compute_all([[0.3], [0.8]])
    assert_metrics(got, {
        "transfer": NAN, "avg": 0.8, "last": 0.8, "mft": 0.8, "mfn": 0.8, "maa": 0.8,
        "bwt": NAN, "fwt": NAN, "forgetting": NAN, "general_retention": NAN,
    })


def test_nan_cells_are_skipped():
    R = np.array(R3)
    R[1, 2] = NAN  # task 3 not evaluated after task 1
    R[3, 0] = NAN  # task 1 not evaluated at the end
    assert_metrics(compute_all(R), {
        # task 2: 0.5; task 3: rows 1..2 -> [NaN, 0.4] -> 0.4; (0.5 + 0.4) / 2
        "transfer": 0.45,
        # 5.95 - 0.2 - 0.7 = 5.05 over the 7 defined cells
        "avg": 5.05 / 7,
        # (0.6 + 0.9) / 2
        "last": 0.75,
        "mft": 2.6 / 3,
        "mfn": 0.75,
        # t=1: 0.9; t=2: 0.875; t=3: (0.6 + 0.9) / 2 = 0.75
        "maa": (0.9 + 0.875 + 0.75) / 3,
        # i=1: NaN - 0.9 skipped; i=2: 0.6 - 0.8
        "bwt": -0.2,
        # i=2: 0.5 - 0.4; i=3: 0.4 - 0.3 (row 2 is defined)
        "fwt": 0.1,
        # j=1: final NaN, skipped; j=2: 0.8 - 0.6
        "forgetting": 0.2,
        "general_retention": NAN,
    })


def test_none_is_nan():
    R = [list(row) for row in R3]
    R[1][2] = None
    expected = np.array(R3)
    expected[1, 2] = NAN
    assert compute_all(R)["transfer"] == pytest.approx(compute_all(expected)["transfer"]) == pytest.approx(0.45)


def test_all_nan_zero_shot_row():
    R = np.array(R3)
    R[0] = NAN
    got = compute_all(R)
    assert math.isnan(got["fwt"])  # no reference row
    for name in ("transfer", "avg", "last", "mft", "maa", "bwt", "forgetting"):  # row 0 plays no part in these
        assert got[name] == pytest.approx(R3_EXPECTED[name]), name


def test_undefined_metric_is_nan_without_warnings(recwarn):
    R = np.full((3, 2), NAN)
    assert all(math.isnan(v) for v in compute_all(R).values())
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_general_retention():
    # a: 0.4 / 0.8 = 0.5; b: 0.5 / 0.5 = 1.0; mean 0.75
    assert metrics.general_retention({"a": [0.8, 0.7, 0.4], "b": [0.5, 0.9, 0.5]}) == pytest.approx(0.75)
    # a has a zero denominator, c a missing final value: only b = 0.25 / 0.5 counts
    got = metrics.general_retention({"a": [0.0, 0.1, 0.2], "b": [0.5, 0.4, 0.25], "c": [0.5, 0.5, None]})
    assert got == pytest.approx(0.5)
    assert math.isnan(metrics.general_retention({"a": [0.0, 0.1, 0.2]}))
    assert math.isnan(metrics.general_retention({}))
    assert math.isnan(metrics.general_retention(None))
    # through compute_all, one value per matrix row
    assert compute_all([[0.3], [0.8]], {"g": [0.9, 0.81]})["general_retention"] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.zeros((3, 3)), r"must have T\+1 rows for T tasks, got shape \(3, 3\)"),
        (np.zeros((2, 3)), r"must have T\+1 rows for T tasks, got shape \(2, 3\)"),
        (np.zeros(3), r"must be 2-D .* got shape \(3,\)"),
        (np.zeros((2, 2, 1)), r"must be 2-D"),
        (np.zeros((1, 0)), r"at least one task"),
        ([[0.5], [1.5]], r"fractions in \[0, 1\] .* got 1.5 at row 1, column 0"),
        ([[-0.1], [0.5]], r"got -0.1 at row 0, column 0"),
        ([[45.0], [90.0]], r"2 bad cell\(s\); percentages must be divided by 100"),
        ([[0.5], [math.inf]], r"got inf at row 1"),
        ([[0.5], ["high"]], r"must hold numbers"),
        ([[0.5, 0.4], [0.5]], r"must hold numbers"),
    ],
)
def test_invalid_matrix(matrix, message):
    with pytest.raises(ValueError, match=message):
        compute_all(matrix)


@pytest.mark.parametrize(
    ("general", "message"),
    [
        ({"g": [0.9, 0.8]}, r"'g' needs one value per matrix row \(3\), got 2"),
        ({"g": [0.9, 0.8, 90.0]}, r"'g': value 90.0 at row 2 is not a fraction"),
        ({"g": [0.9, 0.8, "x"]}, r"value 'x' at row 2"),
    ],
)
def test_invalid_general(general, message):
    with pytest.raises(ValueError, match=message):
        compute_all(np.zeros((3, 2)), general)


def test_evaluate_module_loads_offline_and_agrees(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = metrics.load_metric()
    assert type(metric).__name__ == "KeepLoRAMetric"

    with_gaps = [list(row) for row in R3]
    with_gaps[1][2] = None
    with_gaps[3][0] = NAN
    general = {"g": [0.8, 0.7, 0.6, 0.4]}
    got = metric.compute(accuracy_matrix=with_gaps, general=general)
    assert_metrics(got, compute_all(with_gaps, general))

    metric.add(accuracy_matrix=R3[0])  # one row at a time, then the rest as a batch
    metric.add_batch(accuracy_matrix=R3[1:])
    assert_metrics(metric.compute(), R3_EXPECTED)


def test_metric_script_ships_inside_the_package():
    script = metrics.METRIC_DIR / f"{metrics.METRIC_DIR.name}.py"
    assert script.is_file()  # evaluate.load(dir) needs dir/<dir name>.py
