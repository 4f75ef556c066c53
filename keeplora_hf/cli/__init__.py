"""The `keeplora-hf` command: `demo`, `pretrain` (main.py), `analyze` (analyze.py), `push` and `export` (push.py),
with the argument types they share (arg_types.py)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
