"""Reading adapter files: safetensors only, and whole, with errors that name the file.

PEFT falls back to ``adapter_model.bin`` (a pickle) when a folder has no safetensors file; peft-hcp
refuses it unread. ``safetensors.safe_open`` validates the whole header (offsets, shapes, coverage of the
file) when it opens a file; its terse ``SafetensorError`` is re-raised as a :class:`CheckpointError`
that names the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

from peft_hcp.errors import CheckpointError


#: safetensors' dtype names (``get_dtype()``) and PyTorch's types
_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@contextmanager
def _opened(path: str) -> Iterator[Any]:
    """``safe_open(path)``, with a truncated or malformed file raised as a ``CheckpointError`` naming it."""
    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is truncated or not a valid safetensors file: {exc}") from exc


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file ``path``; a truncated or malformed file is a ``CheckpointError``."""
    with _opened(path) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is not iterable


def read_header(path: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` as empty ``meta`` tensors of their shapes and dtypes.

    Only the header is read (``get_slice(...).get_shape()``), so this costs no memory whatever the file
    claims; a malformed header, or a dtype PyTorch does not have, is a ``CheckpointError``.
    """
    with _opened(path) as handle:
        slices = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
        try:
            return {
                key: torch.empty(part.get_shape(), dtype=_DTYPES[part.get_dtype()], device="meta")
                for key, part in slices.items()
            }
        except KeyError as exc:
            raise CheckpointError(f"{path} holds a tensor of dtype {exc}, which PyTorch has no type for.") from exc


def check_safetensors_file(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete safetensors file (reads only its header)."""
    with _opened(path):
        pass


def check_adapter_folder(folder: str) -> None:
    """Validate a local adapter folder: a complete safetensors file, never a pickle."""
    weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(weights):
        check_safetensors_file(weights)
    elif os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        raise CheckpointError(
            f"{folder} holds only {WEIGHTS_NAME}, a pickle; peft-hcp loads weights from "
            f"{SAFETENSORS_WEIGHTS_NAME} only. Convert it where you trust its origin."
        )
