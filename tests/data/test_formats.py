"""Loaders accept the documented formats and reject every malformed row, naming file, row and problem."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from keeplora_hf.data import (
    DataFormatError,
    VideoReadError,
    load_classification,
    load_llava_json,
    load_video_qa_json,
    read_frames,
    write_video,
)


def _image(path: Path, colour: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def _clip(path: Path, frames: int = 4) -> Path:
    video = np.zeros((frames, 16, 16, 3), np.uint8)
    for t in range(frames):
        video[t, :, :, 0] = 40 * t
    write_video(path, video, fps=4)
    return path


def _write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    _image(folder / "a.png")
    _image(folder / "sub" / "b.png", (0, 0, 255))
    return folder


GOOD_LLAVA_ROWS = [
    {"id": "one", "image": "a.png", "conversations": _turns("<image>\nWhat colour?", "red")},
    {"id": 7, "image": ["a.png", "sub/b.png"], "conversations": _turns("<image> and <image>: same?", "no")},
    {"conversations": _turns("How many?", "3", "And now?", "4")},
]


def test_llava_json_rows_become_chat_rows(tmp_path: Path, images: Path) -> None:
    dataset = load_llava_json(_write_json(tmp_path / "train.json", GOOD_LLAVA_ROWS), images)
    assert set(dataset.column_names) == {"id", "images", "messages"}
    assert dataset["id"] == ["one", "7", "2"]  # ids as strings, the row index where there is none
    assert dataset[0]["images"] == [str((images / "a.png").resolve())]
    assert dataset[1]["images"][1] == str((images / "sub" / "b.png").resolve())
    assert dataset[2]["images"] == []
    assert dataset[0]["messages"] == [
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "red"},
    ]
    assert [m["role"] for m in dataset[2]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert dataset.info.description == str(tmp_path / "train.json")


def test_llava_jsonl_is_accepted(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GOOD_LLAVA_ROWS) + "\n")
    assert len(load_llava_json(path, images)) == 3


MALFORMED_LLAVA = [
    ("not-an-object", "row is not an object"),
    ({"id": "bad", "image": "a.png"}, "missing or empty 'conversations'"),
    ({"id": "bad", "conversations": []}, "missing or empty 'conversations'"),
    ({"id": "bad", "conversations": _turns("Hi?", "yes")[::-1]}, "roles must alternate"),
    ({"id": "bad", "conversations": [{"from": "human", "value": "a"}] * 2}, "roles must alternate"),
    ({"id": "bad", "conversations": [{"from": "robot", "value": "a"}]}, "'from' must be 'human' or 'gpt'"),
    ({"id": "bad", "conversations": _turns("Hi?", "   ")}, "empty answer"),
    ({"id": "bad", "conversations": _turns("Hi?", "")}, "empty answer"),
    ({"id": "bad", "conversations": _turns("Hi?")}, "ends with a human turn"),
    ({"id": "bad", "image": "missing.png", "conversations": _turns("<image> Hi?", "yes")}, "not found"),
    ({"id": "bad", "image": "a.png", "conversations": _turns("Hi?", "yes")}, "0 <image> marker(s)"),
    ({"id": "bad", "conversations": _turns("<image> Hi?", "yes")}, "1 <image> marker(s) in the human turns but 0"),
    ({"id": "bad", "image": "a.png", "conversations": _turns("<image><image>?", "no")}, "2 <image> marker(s)"),
    ({"id": "bad", "image": 3, "conversations": _turns("<image>?", "no")}, "'image' must be a path"),
    ({"id": "bad", "conversations": _turns("<video> Hi?", "yes")}, "<video> in a dataset of <image> rows"),
]


@pytest.mark.parametrize("row, problem", MALFORMED_LLAVA)
def test_llava_malformed_row_names_file_row_and_problem(
    tmp_path: Path, images: Path, row: object, problem: str
) -> None:
    path = _write_json(tmp_path / "train.json", [GOOD_LLAVA_ROWS[0], row])
    with pytest.raises(DataFormatError) as caught:
        load_llava_json(path, images)
    [message] = caught.value.errors
    assert message.startswith(f"{path}: row 1")
    if isinstance(row, dict):
        assert "(id 'bad')" in message
    assert problem in message


def test_llava_unreadable_image_is_reported(tmp_path: Path, images: Path) -> None:
    (images / "broken.png").write_bytes(b"not a png")
    rows = [{"id": "x", "image": "broken.png", "conversations": _turns("<image>?", "red")}]
    with pytest.raises(DataFormatError, match=r"row 0 \(id 'x'\): image file .*broken.png.* cannot be read"):
        load_llava_json(_write_json(tmp_path / "t.json", rows), images)


def test_every_bad_row_is_reported_at_once(tmp_path: Path, images: Path) -> None:
    rows = [{"id": "a", "conversations": _turns("Hi?", "")}, GOOD_LLAVA_ROWS[0], {"id": "b", "conversations": []}]
    with pytest.raises(DataFormatError) as caught:
        load_llava_json(_write_json(tmp_path / "t.json", rows), images)
    assert len(caught.value.errors) == 2
    assert "row 0 (id 'a')" in caught.value.errors[0] and "row 2 (id 'b')" in caught.value.errors[1]


def test_llava_file_level_errors(tmp_path: Path, images: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_llava_json(tmp_path / "nope.json", images)
    (tmp_path / "bad.json").write_text("[{'single': 'quotes'}]")
    with pytest.raises(DataFormatError, match=r"bad.json: not valid JSON"):
        load_llava_json(tmp_path / "bad.json", images)
    _write_json(tmp_path / "dict.json", {"rows": []})
    with pytest.raises(DataFormatError, match=r"dict.json: expected a JSON list"):
        load_llava_json(tmp_path / "dict.json", images)
    _write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataFormatError, match=r"empty.json: no rows"):
        load_llava_json(tmp_path / "empty.json", images)


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    _clip(folder / "clip.mp4")
    (folder / "garbage.mp4").write_bytes(b"\x00not a video" * 20)
    with av.open(str(folder / "sound.wav"), "w") as container:  # a real media file with no video frame
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return folder


def test_video_qa_both_forms(tmp_path: Path, videos: Path) -> None:
    rows = [
        {"id": "q", "video": "clip.mp4", "question": "Where does it move?", "answer": "left"},
        {"id": "m", "video": "clip.mp4", "question": "Colour?", "answer": "red", "options": ["red", "blue"]},
        {"id": "n", "video": "clip.mp4", "question": "How many?", "answer": 3},
        {"id": "c", "video": "clip.mp4", "conversations": _turns("<video>\nWhat moves?", "a dot")},
    ]
    dataset = load_video_qa_json(_write_json(tmp_path / "v.json", rows), videos)
    assert set(dataset.column_names) == {"id", "videos", "messages"}
    assert dataset[0]["videos"] == [str((videos / "clip.mp4").resolve())]
    assert dataset[0]["messages"][0]["content"] == "<video>\nWhere does it move?"
    assert dataset[1]["messages"][0]["content"] == "<video>\nColour?\nOptions: red, blue"
    assert dataset[2]["messages"][1] == {"role": "assistant", "content": "3"}
    assert dataset[3]["messages"][0]["content"] == "<video>\nWhat moves?"


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"id": "bad", "video": "none.mp4", "question": "Q?", "answer": "a"}, "video file"),
        ({"id": "bad", "video": "garbage.mp4", "question": "Q?", "answer": "a"}, "unreadable video"),
        ({"id": "bad", "video": "sound.wav", "question": "Q?", "answer": "a"}, "no video stream"),
        ({"id": "bad", "video": "clip.mp4", "question": "Q?", "answer": " "}, "missing or empty 'answer'"),
        ({"id": "bad", "video": "clip.mp4", "question": "Q?"}, "missing or empty 'answer'"),
        ({"id": "bad", "video": "clip.mp4", "question": "", "answer": "a"}, "missing or empty 'question'"),
        ({"id": "bad", "question": "Q?", "answer": "a"}, "missing 'video'"),
        ({"id": "bad", "video": "clip.mp4", "question": "Q?", "answer": "a", "options": []}, "'options' must be"),
        ({"id": "bad", "video": "clip.mp4", "conversations": _turns("What moves?", "a dot")}, "0 <video> marker(s)"),
        ({"id": "bad", "video": "clip.mp4", "conversations": _turns("<video>?", "")}, "empty answer"),
        ({"id": "bad", "video": "clip.mp4", "conversations": _turns("<image><video>?", "a")}, "<image> in a"),
    ],
)
def test_video_qa_malformed_row_names_file_row_and_problem(
    tmp_path: Path, videos: Path, row: dict, problem: str
) -> None:
    good = {"id": "ok", "video": "clip.mp4", "question": "Q?", "answer": "a"}
    path = _write_json(tmp_path / "v.json", [good, row])
    with pytest.raises(DataFormatError) as caught:
        load_video_qa_json(path, videos)
    [message] = caught.value.errors
    assert message.startswith(f"{path}: row 1 (id 'bad')")
    assert problem in message


def test_read_frames_write_video_round_trip(tmp_path: Path) -> None:
    """Lossless encoding, uniform sampling from first to last frame, short clips padded by repetition."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (9, 16, 24, 3), dtype=np.uint8)
    frames[:, :8] = (np.arange(9) * 25)[:, None, None, None]  # flat regions must survive exactly
    write_video(tmp_path / "v.mp4", frames, fps=3)
    sampled = read_frames(tmp_path / "v.mp4", 3)
    assert sampled.shape == (3, 16, 24, 3) and sampled.dtype == np.uint8
    np.testing.assert_array_equal(sampled[:, :8], frames[[0, 4, 8], :8])
    assert np.abs(sampled.astype(int) - frames[[0, 4, 8]]).mean() < 2  # colour-space rounding only
    assert read_frames(tmp_path / "v.mp4", 20).shape[0] == 20


def test_video_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VideoReadError, match="missing.mp4"):
        read_frames(tmp_path / "missing.mp4", 2)
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 50)
    with pytest.raises(VideoReadError, match="junk.mp4: cannot read video"):
        read_frames(tmp_path / "junk.mp4", 2)
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 16, 16, 3), np.float32))


def test_classification_from_class_folders(tmp_path: Path) -> None:
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        for i in range(2):
            _image(tmp_path / "tree" / name / f"{i}.png", colour)
    (tmp_path / "tree" / "red" / "notes.txt").write_text("ignored: not an image")
    dataset = load_classification(tmp_path / "tree")
    assert dataset.features["label"].names == ["blue", "red"]
    assert len(dataset) == 4 and dataset["label"] == [0, 0, 1, 1]
    assert Path(dataset[0]["image"]).is_absolute()


def test_classification_from_tables(tmp_path: Path, images: Path) -> None:
    with (tmp_path / "t.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["image", "label"], ["images/a.png", "red"], ["images/sub/b.png", "blue"]])
    dataset = load_classification(tmp_path / "t.csv")
    assert dataset.features["label"].names == ["blue", "red"] and dataset["label"] == [1, 0]
    rows = [{"file": "a.png", "y": 1}, {"file": "sub/b.png", "y": 0}]
    path = _write_json(tmp_path / "t.json", rows)
    dataset = load_classification(path, images, class_names=["cat", "dog"], image_column="file", label_column="y")
    assert dataset.features["label"].names == ["cat", "dog"] and dataset["label"] == [1, 0]


@pytest.mark.parametrize(
    "row, class_names, problem",
    [
        ({"image": "a.png", "label": "dog"}, ["cat"], "label 'dog' is not one of class_names"),
        ({"image": "a.png", "label": 5}, ["cat"], "label 5 outside 0..0"),
        ({"image": "a.png", "label": 0}, None, "integer label 0 needs class_names"),
        ({"image": "gone.png", "label": "cat"}, ["cat"], "not found"),
        ({"label": "cat"}, ["cat"], "missing 'image'"),
    ],
)
def test_classification_malformed_row(
    tmp_path: Path, images: Path, row: dict, class_names: list[str] | None, problem: str
) -> None:
    path = _write_json(tmp_path / "t.json", [row])
    with pytest.raises(DataFormatError) as caught:
        load_classification(path, images, class_names=class_names)
    assert caught.value.errors[0].startswith(f"{path}: row 0") and problem in caught.value.errors[0]
