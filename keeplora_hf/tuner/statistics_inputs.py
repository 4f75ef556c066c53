"""What the statistics passes are given, checked so that a bad value is refused naming what it is and what to pass:
the loss `loss_fn` returns, and data that has no length or is used up."""

from __future__ import annotations

from typing import Any

import torch


def checked_loss(loss: Any, description: str) -> torch.Tensor:
    """`loss_fn`'s result, refused with what it was unless backward can follow it: one value that requires grad."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{description}: loss_fn returned a {type(loss).__name__} ({loss!r:.60}); it must return a scalar "
            "torch.Tensor computed from the model's outputs, e.g. model(**batch).loss (not loss.item())"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"{description}: loss_fn returned a tensor of shape {tuple(loss.shape)} "
            f"(requires_grad={loss.requires_grad}); it must return a scalar: reduce it, e.g. the mean over the tokens "
            "(loss.mean())"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"{description}: loss_fn returned a tensor of shape {tuple(loss.shape)} with requires_grad=False (no "
            "grad_fn), so it does not depend on the model's parameters or inputs: return the loss as computed from "
            "the model's outputs, not detached (.detach()) nor computed under torch.no_grad()"
        )
    return loss


def no_batches_error(caller: str) -> ValueError:
    """The error of a data pass that saw no batch; an iterator already used up by an earlier pass is the usual cause."""
    return ValueError(
        f"{caller}: the dataloader yielded no batches (a generator or iterator is used up by one pass: give each of "
        "begin_task and end_task a fresh one, or a list or DataLoader). Nothing was changed."
    )


def dataset_length(dataset: Any, caller: str) -> int:
    """`len(dataset)`, or an error saying what to pass instead when the dataset has no length (streamed data)."""
    try:
        return len(dataset)
    except TypeError:
        raise TypeError(
            f"{caller} draws gradient_data_ratio of the training set at random, which needs its size, but the training "
            f"dataset ({type(dataset).__name__}) has no len(), e.g. an IterableDataset or datasets' streaming=True. Use "
            "a map-style dataset (load it without streaming=True), or call begin_task/end_task yourself with "
            "max_batches=N."
        ) from None
