"""The closed word list of the synthetic benchmark.

The benchmark's model has a word-level tokenizer with a few dozen text ids, and exact-match scoring compares
single answer words; a word outside the tokenizer would become `<unk>` and make different answers identical.
So every question and answer the generators can produce is spelt with these words only, and the tests check
it for every generator.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["WORDS", "check_vocabulary", "uncovered_words"]

WORDS: tuple[str, ...] = (
    # question words
    "what", "which", "where", "how", "many", "is", "are", "does", "there", "this", "the", "a", "on", "at", "in",
    "or", "move", "colour", "number", "direction", "object", "objects", "dot", "line", "frame", "video",
    "bigger", "first",
    # answers: colours, counts, places, directions
    "red", "green", "blue", "yellow", "white", "purple",
    "one", "two", "three", "four",
    "left", "right", "top", "bottom", "above", "up", "down",
    "yes", "no",
)  # fmt: skip


def uncovered_words(texts: Iterable[str]) -> set[str]:
    """Words of `texts` (split on whitespace) that are not in `WORDS`."""
    known = set(WORDS)
    return {word for text in texts for word in text.split() if word not in known}


def check_vocabulary(texts: Iterable[str]) -> None:
    """Raise `ValueError` naming every word of `texts` outside `WORDS`."""
    unknown = uncovered_words(texts)
    if unknown:
        raise ValueError(f"words outside the benchmark vocabulary: {sorted(unknown)}")
