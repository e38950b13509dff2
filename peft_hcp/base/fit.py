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
    ``expected`` (those of ``target``), each of the same shape."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshapen = [
        f"{key}: checkpoint {tuple(found[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & found.keys())
        if found[key].shape != expected[key].shape
    ]
    if missing or unexpected or misshapen:
        raise mismatch_error(source, target, missing=missing, unexpected=unexpected, misshapen=misshapen)


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
