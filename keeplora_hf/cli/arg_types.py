"""Argument types of the `keeplora-hf` command: a number out of range is refused while the arguments are parsed,
with the flag named by argparse, rather than as an IndexError or a division by zero deep into a run."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(minimum: int) -> Callable[[str], int]:
    """An integer of at least `minimum` (1 for counts and sizes, 0 for seeds)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {minimum}, got {text!r}")
        return value

    return parse


def number(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in `[low, high]`, or `(low, high]` with `low_open` (a learning rate, a scale: above 0)."""
    if high < math.inf:
        shown = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        shown = f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be a number {shown}, got {text!r}")
        return value

    return parse


def auto_or(parse: Callable[[str], float]) -> Callable[[str], float | str]:
    """'auto', or what `parse` accepts (its error then also says 'auto' is allowed)."""

    def parse_or_auto(text: str) -> float | str:
        if text == "auto":
            return text
        try:
            return parse(text)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"must be 'auto' or {str(error).removeprefix('must be ')}") from None

    return parse_or_auto
