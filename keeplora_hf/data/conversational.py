"""The chat rows our loaders return, as the conversational `messages` + `images` rows TRL's `SFTTrainer` trains on."""

from __future__ import annotations

import datasets

from .collators import content_blocks


def to_conversational(dataset: datasets.Dataset) -> datasets.Dataset:
    """Rows of `load_llava_json` (`messages` with `<image>` markers in the text, `images` as paths) in TRL's VLM
    format: each message's content a list of `{"type": "image"}` / `{"type": "text"}` blocks, `images` decoded."""

    def convert(row: dict) -> dict:
        return {"messages": [{"role": m["role"], "content": content_blocks(m["content"])} for m in row["messages"]]}

    converted = dataset.map(convert, remove_columns=[c for c in dataset.column_names if c not in ("images",)])
    return converted.cast_column("images", datasets.Sequence(datasets.Image()))
