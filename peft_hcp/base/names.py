"""Adapter names and the folders they become: the one rule every name and every saved path follows.

An adapter name becomes a key in a ``ModuleDict``, a component of a state-dict key and, when a set is
saved, a folder name (``<save_directory>/<component>/<name>``). A name read from a downloaded manifest is
data, so it must stay a plain name: :func:`name_problem` says what is wrong with one, and
:func:`check_adapter_name` refuses it. ``attach``, every peft-hcp tuner's ``inject_adapter`` (behind
``get_peft_model``, ``add_adapter`` and ``load_adapter``), the set manifest and ``save_adapter`` all use it.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Optional


#: the longest adapter name accepted (a folder name stays well under every file system's limit)
MAX_NAME_LENGTH = 128
#: characters that separate paths (or, ``:``, name a drive) on some operating system
_PATH_CHARACTERS = frozenset("/\\:")


def name_problem(name: object) -> Optional[str]:
    """What makes ``name`` unfit as an adapter name, or ``None`` for a plain name.

    A plain name is a non-empty string of at most :data:`MAX_NAME_LENGTH` characters with no path separator
    (``/``, ``\\``, ``:``), no ``.`` (PyTorch's module-path separator, and ``..``) and no control character.
    """
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    if "." in name:
        return "it contains '.'"
    separators = sorted(_PATH_CHARACTERS & set(name))
    if separators:
        return f"it contains the path separator {separators[0]!r}"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return "it contains a control character"
    return None


def check_adapter_name(name: object) -> None:
    """Raise ``ValueError`` unless ``name`` is a plain adapter name (see :func:`name_problem`)."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"Adapter name {name!r:.80} is refused: {problem}. Use a plain name such as 'style'.")


def is_inside(root: str, path: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it, once both are resolved (``..`` and symbolic links)."""
    root, path = os.path.realpath(root), os.path.realpath(path)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
