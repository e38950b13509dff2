"""The one strict check of weights against the model that is to take them, and its one message.

Every route that copies weights in (an adapter checkpoint, a diffusers ControlNet, the embedded base weights)
checks the whole set before copying any: the same keys, each of the same shape. What does not fit is a
:class:`~peft_hcp.errors.CheckpointError` naming the source, the receiver, and the missing, unexpected and
mis-shaped keys (with both shapes), so a refused load changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from peft_hcp.errors import CheckpointError, few


def check_state_dict(
    found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str, target: str
) -> None:
    """Raise :class:`CheckpointError` unless ``found`` (the weights of ``source``) has exactly the keys of
    ``expected`` (those of ``target``), each of the same shape and kind (floating point or not; the dtype is named
    where that is what differs)."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshapen = [
        f"{key}: checkpoint {_described(found[key], expected[key])} vs model {_described(expected[key], found[key])}"
        for key in sorted(expected.keys() & found.keys())
        if not _fits(found[key], expected[key])
    ]
    if missing or unexpected or misshapen:
        raise mismatch_error(source, target, missing=missing, unexpected=unexpected, misshapen=misshapen)


def _fits(found: torch.Tensor, expected: torch.Tensor) -> bool:
    return found.shape == expected.shape and found.dtype.is_floating_point == expected.dtype.is_floating_point


def _described(tensor: torch.Tensor, other: torch.Tensor) -> str:
    """``tensor``'s shape, and its dtype where that is what differs from ``other``'s."""
    shape = str(tuple(tensor.shape))
    return shape if tensor.shape != other.shape else f"{shape} {str(tensor.dtype).removeprefix('torch.')}"


def mismatch_error(
    source: str,
    target: str,
    *,
    missing: Sequence[str] = (),
    unexpected: Sequence[str] = (),
    misshapen: Sequence[str] = (),
) -> CheckpointError:
    """The error for weights of ``source`` that do not fit ``target`` (each list: the first few, then how many more)."""
    parts = [
        f"{label} {few(list(keys))}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", misshapen))
        if keys
    ]
    return CheckpointError(f"{source} does not fit {target}: {'; '.join(parts)}.")
