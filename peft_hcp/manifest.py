"""Reading an adapter set's layout: its manifest ``adapter_set.json``, or its adapter folders, as untrusted data.

A set from the Hub names its own subfolders and adapter names, so nothing it names may lead outside it:
before anything is read from a leaf folder or attached, every entry is checked, and a violation is one
:class:`~peft_hcp.errors.CheckpointError` that names the manifest, the entry and the field.

* ``component`` is ``""`` (a bare model) or one of :data:`PLUGIN_COMPONENTS`;
* ``name`` is a plain adapter name (:func:`peft_hcp.base.names.name_problem`), one per component;
* ``subfolder`` is ``""`` or a relative ``/``-separated path with no empty, ``.`` or ``..`` part, no ``\\``
  or drive, which stays inside the set's root once symbolic links are resolved, and is a folder holding an
  ``adapter_config.json``; no two entries share one;
* ``peft_type`` is a non-empty string (the folder's own config says which type it is; see ``_load_one``).

The files read from a set (manifest, configs, weights) must resolve inside the set too. A set downloaded
from the Hub is a snapshot folder of the Hub cache, whose files are links into that repo's ``blobs``
folder: those are inside what was downloaded, and accepted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from peft_hcp.base.components import PLUGIN_COMPONENTS
from peft_hcp.base.names import is_inside, name_problem
from peft_hcp.errors import CheckpointError


MANIFEST_NAME = "adapter_set.json"
MANIFEST_FORMAT = "peft-hcp-adapter-set"
MANIFEST_VERSION = 1
#: Pipeline components that may carry plugins, in the order they are saved.
_ENTRY_FIELDS = ("component", "name", "subfolder", "peft_type")
#: how the Hub cache names a repo's folder
_HUB_REPO_FOLDERS = ("models--", "datasets--", "spaces--")


@dataclass(frozen=True)
class SetEntry:
    """One adapter of a set: where it lives on the model and in the folder."""

    component: str  # "" for a bare model
    name: str
    subfolder: str  # relative to the set's root, "" for the root itself
    peft_type: str


def read_set(folder: str) -> list[SetEntry]:
    """The entries of the set in ``folder``: from its manifest, or found by its adapter folders; all checked."""
    manifest = os.path.join(folder, MANIFEST_NAME)
    if os.path.isfile(manifest):
        return _read_manifest(folder, manifest)
    entries = []
    for root, _, files in sorted(os.walk(folder)):  # symbolic links to folders are not followed
        if CONFIG_NAME not in files:
            continue
        parts = [] if root == folder else os.path.relpath(root, folder).split(os.sep)
        if len(parts) > 2:
            continue
        component = parts[0] if parts and parts[0] in PLUGIN_COMPONENTS else ""
        rest = parts[1:] if component else parts
        name = rest[0] if rest else "default"
        problem = name_problem(name)
        if problem is not None:
            raise CheckpointError(f"{root}: the folder name {name!r:.80} is not a plain adapter name: {problem}.")
        check_leaf_files(folder, root)
        entries.append(SetEntry(component, name, "/".join(parts), peft_type_of(root)))
    if not entries:
        raise CheckpointError(f"{folder} holds no {CONFIG_NAME} and no {MANIFEST_NAME}: it is not an adapter folder.")
    return entries


def peft_type_of(folder: str) -> str:
    """The ``peft_type`` an adapter folder's config names (a ``CheckpointError`` when it names none)."""
    path = os.path.join(folder, CONFIG_NAME)
    config = _read_json(path)
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if not isinstance(peft_type, str) or not peft_type:
        raise CheckpointError(f"{path} has no 'peft_type': it does not say which adapter type it configures.")
    return peft_type


def check_leaf_files(root: str, leaf: str) -> None:
    """Refuse an adapter folder of the set at ``root`` whose config or weights resolve outside the set."""
    for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME):
        if os.path.lexists(os.path.join(leaf, name)):
            check_set_file(root, os.path.join(leaf, name))


def check_set_file(root: str, path: str) -> None:
    """Refuse a file of the set at ``root`` that resolves outside it (a symbolic link pointing elsewhere)."""
    if not (is_inside(root, path) or is_inside(_hub_blobs(root), path)):
        raise CheckpointError(
            f"{path} resolves to {os.path.realpath(path)}, outside the adapter set {root}; a set's files must lie "
            "inside it."
        )


def _hub_blobs(root: str) -> str:
    """The ``blobs`` folder of the Hub cache repo whose snapshot holds ``root`` (``root`` itself otherwise)."""
    path = os.path.realpath(root)
    while os.path.dirname(path) != path:
        parent = os.path.dirname(path)
        repo = os.path.dirname(parent)
        if os.path.basename(parent) == "snapshots" and os.path.basename(repo).startswith(_HUB_REPO_FOLDERS):
            return os.path.join(repo, "blobs")
        path = parent
    return root


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
        raise CheckpointError(f"{path} is not a valid JSON file: {exc}") from exc


def _read_manifest(folder: str, manifest: str) -> list[SetEntry]:
    check_set_file(folder, manifest)
    data = _read_json(manifest)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest} is not a peft-hcp adapter set manifest.")
    version = data.get("version")
    if version != MANIFEST_VERSION or isinstance(version, bool):
        raise CheckpointError(
            f"{manifest}: field 'version' is {version!r:.40}; this peft-hcp reads version {MANIFEST_VERSION}."
        )
    items = data.get("adapters")
    if not isinstance(items, list) or not items:
        raise CheckpointError(f"{manifest}: field 'adapters' must be a non-empty list of entries.")
    entries = [_entry(folder, manifest, index, item) for index, item in enumerate(items)]
    for field in ("subfolder", "name"):
        seen: dict[tuple[str, ...], int] = {}
        for index, entry in enumerate(entries):
            key = (entry.subfolder,) if field == "subfolder" else (entry.component, entry.name)
            if key in seen:
                raise CheckpointError(
                    f"{manifest}: entry {index}, field {field!r}: {getattr(entry, field)!r} repeats entry {seen[key]}."
                )
            seen[key] = index
    return entries


def _entry(folder: str, manifest: str, index: int, item: Any) -> SetEntry:
    def refuse(field: str, problem: str) -> CheckpointError:
        value = item.get(field) if isinstance(item, dict) else item
        return CheckpointError(f"{manifest}: entry {index}, field {field!r} ({value!r:.80}): {problem}.")

    if not isinstance(item, dict) or sorted(item) != sorted(_ENTRY_FIELDS):
        keys = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise CheckpointError(
            f"{manifest}: entry {index} must have exactly the fields {list(_ENTRY_FIELDS)}, not {keys}."
        )
    for field in _ENTRY_FIELDS:
        if not isinstance(item[field], str):
            raise refuse(field, f"a string is needed, not a {type(item[field]).__name__}")
    entry = SetEntry(**item)
    if entry.component not in ("", *PLUGIN_COMPONENTS):
        raise refuse("component", f"not a component that carries adapters ({['', *PLUGIN_COMPONENTS]})")
    problem = name_problem(entry.name)
    if problem is not None:
        raise refuse("name", f"not a plain adapter name: {problem}")
    problem = _subfolder_problem(folder, entry.subfolder)
    if problem is not None:
        raise refuse("subfolder", problem)
    if not entry.peft_type:
        raise refuse("peft_type", "it is empty")
    return entry


def _subfolder_problem(folder: str, subfolder: str) -> str | None:
    if subfolder:
        if "\\" in subfolder or ":" in subfolder:
            return "a subfolder is '/'-separated, with no '\\' and no drive"
        if subfolder.startswith("/"):
            return "an absolute path; a subfolder is relative to the set's root"
        if any(part in ("", ".", "..") for part in subfolder.split("/")):
            return "it has an empty, '.' or '..' part"
        if any(ord(char) < 32 or ord(char) == 127 for char in subfolder):
            return "it contains a control character"
    path = os.path.join(folder, subfolder)
    if not is_inside(folder, path):
        return f"it resolves to {os.path.realpath(path)}, outside the set (a symbolic link?)"
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return f"the set has no adapter folder there (no {CONFIG_NAME})"
    check_leaf_files(folder, path)
    return None
