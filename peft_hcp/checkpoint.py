"""Checks on adapter files before PEFT reads them: safetensors only, and whole.

PEFT falls back to ``adapter_model.bin`` (a pickle) when a folder has no safetensors file, and a
truncated safetensors file fails deep inside the reader with a terse message. peft-hcp refuses the
first and names the second.
"""

from __future__ import annotations

import json
import os
import struct

from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from peft_hcp.errors import CheckpointError

_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def check_safetensors_file(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _HEADER_LIMIT or 8 + header_len > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes "
                f"but the file has {size}."
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is corrupted: its safetensors header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupted: its safetensors header is not a JSON object.")
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise CheckpointError(f"{path} is truncated: its tensors need {needed} bytes but the file has {size}.")


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
