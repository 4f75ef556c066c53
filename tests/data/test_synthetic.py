"""The synthetic benchmark is deterministic, spelt in its vocabulary, balanced, learnable from pixels, and loadable."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from keeplora_hf.data import load_llava_json, load_video_qa_json, read_frames
from keeplora_hf.data.synthetic import (
    GENERAL_SKILLS,
    IMAGE_TASKS,
    MANIFEST_NAME,
    NUM_FRAMES,
    PALETTE,
    TASK_SPECS,
    VIDEO_SPECS,
    VIDEO_TASKS,
    WORDS,
    check_vocabulary,
    general_corpus,
    general_eval_suite,
    make_task,
    make_video_task,
    uncovered_words,
    write_benchmark,
    write_video_qa_json,
)


def _pixels(image) -> bytes:
    return np.asarray(image).tobytes()


def test_same_seed_same_samples_and_streams_differ():
    for name in IMAGE_TASKS:
        first, again = make_task(name, "train", 12, seed=3), make_task(name, "train", 12, seed=3)
        assert [(_pixels(s.image), s.question, s.answer) for s in first] == [
            (_pixels(s.image), s.question, s.answer) for s in again
        ]
        for other in (make_task(name, "train", 12, seed=4), make_task(name, "eval", 12, seed=3)):
            assert [_pixels(s.image) for s in first] != [_pixels(s.image) for s in other]
    general = [_pixels(s.image) for s in general_corpus(20, seed=1)]
    assert general == [_pixels(s.image) for s in general_corpus(20, seed=1)]
    assert general != [_pixels(s.image) for s in general_eval_suite(20, seed=1)]
    for name in VIDEO_TASKS:
        clips = make_video_task(name, "train", 4, seed=2)
        assert all(np.array_equal(a.frames, b.frames) for a, b in zip(clips, make_video_task(name, "train", 4, seed=2)))


def test_every_word_is_in_the_vocabulary_and_every_vocabulary_word_is_used():
    samples = general_corpus(200) + general_eval_suite(50)
    samples += [s for name in IMAGE_TASKS for s in make_task(name, "train", 40)]
    samples += [s for name in VIDEO_TASKS for s in make_video_task(name, "train", 12)]
    texts = [text for s in samples for text in (s.question, s.answer)]
    check_vocabulary(texts)
    assert {word for text in texts for word in text.split()} == set(WORDS)
    assert all(len(s.answer.split()) == 1 for s in samples)
    assert len(WORDS) == len(set(WORDS)) < 150 and all(word.isalpha() and word.islower() for word in WORDS)
    assert uncovered_words(["what colour is the wombat"]) == {"wombat"}
    with pytest.raises(ValueError, match="wombat"):
        check_vocabulary(["wombat"])


def test_vocabulary_fits_the_tiny_tokenizer():
    """A word outside the tiny models' word-level tokenizer would be <unk>: two answers could become one token."""
    from keeplora_hf.models.processors import TINY_VOCABULARY

    assert set(WORDS) <= set(TINY_VOCABULARY)


def _assert_balanced(answers: list[str], expected: tuple[str, ...]) -> None:
    counts = Counter(answers)
    assert set(counts) == set(expected)
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert max(counts.values()) <= 2 * len(answers) / len(expected)


def test_answers_are_balanced_and_images_are_32x32_rgb():
    for name in IMAGE_TASKS:
        samples = make_task(name, "eval", 61)
        _assert_balanced([s.answer for s in samples], TASK_SPECS[name].answers)
        assert all(s.image.mode == "RGB" and s.image.size == (32, 32) for s in samples)
        assert {s.question for s in samples} == {TASK_SPECS[name].question}
    general = general_corpus(301)
    _assert_balanced([s.skill for s in general], tuple(GENERAL_SKILLS))
    for skill, spec in GENERAL_SKILLS.items():
        _assert_balanced([s.answer for s in general if s.skill == skill], spec.answers)
    assert all(s.image.mode == "RGB" and s.image.size == (32, 32) for s in general)
    for name in VIDEO_TASKS:
        clips = make_video_task(name, "eval", 25)
        _assert_balanced([c.answer for c in clips], VIDEO_SPECS[name].answers)
        assert all(c.frames.shape == (NUM_FRAMES, 32, 32, 3) and c.frames.dtype == np.uint8 for c in clips)


def _pooled_pixels(arrays: np.ndarray, pool: int) -> np.ndarray:
    height, width = arrays.shape[-3:-1]
    shape = arrays.shape[:-3] + (height // pool, pool, width // pool, pool, 3)
    return (arrays.reshape(shape).mean(axis=(-4, -2)) / 255).reshape(len(arrays), -1)


def _colour_histograms(arrays: np.ndarray, groups: int) -> np.ndarray:
    """Fraction of the pixels of each of `groups` equal parts of a sample (a clip's frames) in 4x4x4 RGB bins."""
    bins = arrays.reshape(len(arrays) * groups, -1, 3) // 64
    codes = (bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).astype(np.int64)
    offsets = np.arange(len(codes))[:, None] * 64
    counts = np.bincount((codes + offsets).ravel(), minlength=len(codes) * 64).reshape(len(codes), 64)
    return (counts / codes.shape[1]).reshape(len(arrays), -1)


def _probe_accuracy(train: list, test: list, pool: int) -> float:
    """Best held-out accuracy of logistic regression on coarse pixels or on colour histograms (whole sample or
    per frame).

    Local cues (where, which way) show in the pixels, amounts (how many red blobs, which colour is largest) in
    the histograms; a probe this simple succeeding shows the answer is in the pixels, not in some artefact.
    """
    pixels = [[s.frames if hasattr(s, "frames") else np.asarray(s.image) for s in part] for part in (train, test)]
    arrays = [np.stack(part) for part in pixels]
    answers = [[s.answer for s in part] for part in (train, test)]
    frames = arrays[0].shape[1] if arrays[0].ndim == 5 else 1
    features = [lambda a: _pooled_pixels(a, pool), lambda a: _colour_histograms(a, 1)]
    if frames > 1:
        features.append(lambda a: _colour_histograms(a, frames))
    best = 0.0
    for feature in features:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
        probe.fit(feature(arrays[0]), answers[0])
        best = max(best, probe.score(feature(arrays[1]), answers[1]))
    return best


@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_image_task_cue_is_in_the_pixels(name):
    accuracy = _probe_accuracy(make_task(name, "train", 200), make_task(name, "eval", 100), pool=4)
    chance = TASK_SPECS[name].chance
    assert accuracy >= chance + 0.5 * (1 - chance), (name, accuracy, chance)


@pytest.mark.parametrize("name", VIDEO_TASKS)
def test_video_task_cue_is_in_the_frames(name):
    accuracy = _probe_accuracy(make_video_task(name, "train", 160), make_video_task(name, "eval", 80), pool=8)
    chance = VIDEO_SPECS[name].chance
    assert accuracy >= chance + 0.5 * (1 - chance), (name, accuracy, chance)


def test_video_round_trip(tmp_path):
    clips = [clip for name in VIDEO_TASKS for clip in make_video_task(name, "train", 2)]
    path = write_video_qa_json(clips, tmp_path, "clips")
    rows = json.loads(path.read_text())
    assert [set(row) for row in rows] == [{"id", "video", "question", "answer"}] * len(clips)
    for row, clip in zip(rows, clips):
        decoded = read_frames(tmp_path / row["video"], NUM_FRAMES)
        assert decoded.shape == clip.frames.shape
        assert np.abs(decoded.astype(int) - clip.frames.astype(int)).mean() < 3.0
    dataset = load_video_qa_json(path, tmp_path)
    assert dataset[0]["messages"][1]["content"] == clips[0].answer


def _json_bytes(root: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(root.glob("*.json"))}


def test_benchmark_manifest_llava_json_and_idempotence(tmp_path):
    sizes = dict(
        general_size=25, general_eval_size=10, train_size=8, eval_size=4, videos=True, video_train_size=4, video_eval_size=4
    )
    manifest = write_benchmark(tmp_path / "a", seed=5, **sizes)
    root = tmp_path / "a"
    assert json.loads((root / MANIFEST_NAME).read_text()) == manifest
    assert manifest["image_task_order"] == list(IMAGE_TASKS) and manifest["words"] == list(WORDS)
    datasets = [manifest["general"]["train"], manifest["general"]["eval"]]
    datasets += [task[split] for task in manifest["image_tasks"].values() for split in ("train", "eval")]
    assert [d["count"] for d in datasets] == [25, 10] + [8, 4] * len(IMAGE_TASKS)
    for entry in datasets:
        rows = json.loads((root / entry["path"]).read_text())
        assert len(rows) == entry["count"] == sum(entry["answer_counts"].values())
        for row in rows:
            assert set(row) == {"id", "image", "conversations"}
            human, gpt = row["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
            assert (root / row["image"]).is_file()
        dataset = load_llava_json(root / entry["path"], root)
        assert len(dataset) == entry["count"]
    for task in manifest["video_tasks"].values():
        assert len(load_video_qa_json(root / task["eval"]["path"], root)) == 4

    first = _json_bytes(root)
    assert write_benchmark(root, seed=5, **sizes) == manifest
    write_benchmark(tmp_path / "b", seed=5, **sizes)
    assert _json_bytes(root) == first == _json_bytes(tmp_path / "b")
    assert write_benchmark(tmp_path / "c", seed=6, **{**sizes, "videos": False})["seed"] == 6
    assert _json_bytes(tmp_path / "c")["general_train.json"] != first["general_train.json"]

    smaller = write_benchmark(root, seed=5, **{**sizes, "train_size": 3, "videos": False})
    assert smaller["image_tasks"]["digits"]["train"]["count"] == 3
    assert sorted(p.name for p in (root / "images" / "digits_train").iterdir()) == ["0.png", "1.png", "2.png"]
    assert not list(root.rglob(".tmp-*"))


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown image task"):
        make_task("shapes", "train", 1)
    with pytest.raises(ValueError, match="split"):
        make_task("digits", "test", 1)
    with pytest.raises(ValueError, match="unknown video task"):
        make_video_task("digits", "train", 1)


def _palette_mask(image, colour: str) -> np.ndarray:
    """Pixels nearer `colour` than any other palette colour or the darkest-to-grey backgrounds, within the noise."""
    pixels = np.asarray(image, dtype=float)
    references = {name: np.array(rgb, dtype=float) for name, rgb in PALETTE.items()}
    references |= {f"grey{level}": np.full(3, float(level)) for level in (0, 25, 50)}
    distances = {name: np.linalg.norm(pixels - rgb, axis=-1) for name, rgb in references.items()}
    nearest = np.argmin(np.stack(list(distances.values())), axis=0)
    return (nearest == list(references).index(colour)) & (distances[colour] < 80)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_red_side_has_one_red_square_on_the_answers_side_and_another_colour_opposite(seed):
    for sample in make_task("red_side", "train", 40, seed=seed):
        red = _palette_mask(sample.image, "red")
        left, right = red[:, :16].sum(), red[:, 16:].sum()
        on_side, opposite = (left, right) if sample.answer == "left" else (right, left)
        assert on_side >= 80 and opposite <= 5, (sample.answer, left, right)
        other = np.asarray(sample.image).max(axis=-1) > 120
        other_half = other[:, 16:] if sample.answer == "left" else other[:, :16]
        assert other_half.sum() >= 80, "a square of another colour on the other side"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_above_below_dot_is_on_the_answers_side_of_a_full_width_line(seed):
    for sample in make_task("above_below", "train", 40, seed=seed):
        bright = np.asarray(sample.image).max(axis=-1) > 120
        line_rows = np.flatnonzero(bright.mean(axis=1) > 0.9)
        assert len(line_rows) == 3 and np.ptp(line_rows) == 2, line_rows
        dot = bright.copy()
        dot[line_rows] = False
        dot_rows = np.flatnonzero(dot.any(axis=1))
        assert dot.sum() >= 20, "a dot besides the line"
        above = dot_rows.max() < line_rows.min() - 2
        below = dot_rows.min() > line_rows.max() + 2
        assert (above, below) == ((True, False) if sample.answer == "yes" else (False, True)), (sample.answer, dot_rows)
