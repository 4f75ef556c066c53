"""KeepLoRA's own linear algebra runs outside autocast.

Under a 16-bit autocast every matrix product rounds its operands to 16 bits. A product that decides the guarantee
(projecting `A` out of the protected subspace, adding a finished update into a weight, growing the memory, reporting
the update) would then tilt what it computes into the protected subspace by about 1e-3 of its norm, ten times the
bound. So the lifecycle and whatever writes or reports the finished updates leave autocast (`full_precision`), and a
custom loop may call them inside its autocast region. The model's forwards within them (the statistics passes) run as
the model's own wrapper decides (accelerate's autocast wrapper included); the frozen branch, which runs inside the
user's forwards, chooses per call (`FrozenBranch`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import torch

#: the device types autocast can be enabled on
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu")

F = TypeVar("F", bound=Callable)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type`, or None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@contextmanager
def autocast_off() -> Iterator[None]:
    """Autocast disabled on every device type where it is on, for the length of the block."""
    with ExitStack() as stack:
        for device_type in AUTOCAST_DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def full_precision(fn: F) -> F:
    """`fn` run with autocast off (see the module's docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
