"""The fuzz driver of ``test_fuzz_sets.py``: random edits of a valid adapter set, each loaded with ``load_adapter``.

Run in its own process (``python -m tests.hub.fuzz_sets WORKDIR EXAMPLES``) under an address-space limit set by
the test. A valid set (LoRA, LoHa, skip and PReLU on a tiny UNet, LoKr on a tiny CLIP text encoder; the
ControlNet kind, slow to copy, is edited in ``test_untrusted_sets.py``) is saved once; each hypothesis example
copies it, applies one edit to its manifest, an adapter config, a safetensors header or its files, and loads it
into the same two models. What counts as expected:

* the load succeeds and is *equal to the original*: every loaded adapter saves exactly the state of the adapter
  its folder was saved from, and removing the loaded adapters gives the models back exactly; or
* it raises one of peft-hcp's error types (``peft_hcp.errors.PEFT_HCP_ERRORS``), and the models are exactly as
  they were.

In both cases nothing under the work folder outside the edited set is opened while loading (the ``victim`` set
beside it, which symbolic links and ``..`` paths point at, holds other weights), and nothing is written while
loading. Anything else (another exception type, a changed model, a forbidden file access) is recorded.
Prints one JSON line: the number of examples, the outcomes, the peak memory and the unexpected cases.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model_state_dict

from peft_hcp.errors import PEFT_HCP_ERRORS
from peft_hcp.hub import detach, load_adapter, save_adapter
from tests.helpers import assert_model_unchanged, model_snapshot
from tests.hub.set_models import adapted_models, bare_models


ODD_STRINGS = [
    "",
    ".",
    "..",
    "../victim",
    "../victim/unet/lora",
    "unet/../../victim",
    "/tmp",
    "/etc/passwd",
    "C:\\x",
    "unet\\lora",
    "a/b",
    "x" * 5000,
    "nul\x00byte",
    "tab\tname",
    "unet",
    "text_encoder",
    "transformer",
    "unet/lora",
    "unet/skip",
    "HCP_LORA",
    "LORA",
    "re:(",
    "re:.*attn1\\.to_q$",
    "re:.*",
]
ODD_NUMBERS = [0, -1, 1, 2, 3, 7, 2**24, 2**40, 2**63, 2**70, -(2**63), 0.5, 1e-300, 1e308, float("nan"), float("inf")]
ODD_VALUES = st.one_of(
    st.sampled_from(ODD_STRINGS),
    st.sampled_from(ODD_NUMBERS),
    st.none(),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.sampled_from(ODD_NUMBERS + ODD_STRINGS[:12]), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U32", "I64", "U8", "BOOL", "F8_E4M3", "X99", ""]


# -- edits ------------------------------------------------------------------------------------------------


def _json_edit(path: str, change: Callable[[object], object]) -> None:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(change(data), handle)


def _set_path(data, path: list, value):
    """``data`` with the item at ``path`` (keys/indices, the last one may be new) set to ``value``."""
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def _delete_path(data, path: list):
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


def _truncate(path: str, fraction: float) -> None:
    with open(path, "rb") as handle:
        raw = handle.read()
    with open(path, "wb") as handle:
        handle.write(raw[: int(len(raw) * fraction)])


def _read_header(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as handle:
        raw = handle.read()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _write_header(path: str, header: dict, data: bytes, size_delta: int = 0) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text) + size_delta) + text + data)


@st.composite
def edits(draw, leaves: list[str]) -> tuple[str, Callable[[str], None]]:
    """One edit of a set: ``(description, apply(set_folder))``."""
    kind = draw(st.sampled_from(["manifest", "manifest", "config", "config", "header", "header", "files"]))
    leaf = draw(st.sampled_from(leaves))
    if kind == "manifest":
        return draw(_manifest_edit())
    if kind == "config":
        return draw(_config_edit(leaf))
    if kind == "header":
        return draw(_header_edit(leaf))
    return draw(_file_edit(leaf))


@st.composite
def _manifest_edit(draw):
    index = draw(st.integers(0, 6))
    field = draw(st.sampled_from(["component", "name", "subfolder", "peft_type", "extra"]))
    how = draw(st.sampled_from(["set", "set", "delete", "top", "duplicate", "drop", "truncate"]))
    value = draw(ODD_VALUES)
    fraction = draw(st.floats(0, 0.99))

    def apply(folder: str) -> None:
        path = os.path.join(folder, "adapter_set.json")
        if how == "truncate":
            _truncate(path, fraction)
            return

        def change(data):
            entries = data["adapters"]
            i = index % len(entries)
            if how == "set":
                return _set_path(data, ["adapters", i, field], value)
            if how == "delete" and field in entries[i]:
                return _delete_path(data, ["adapters", i, field])
            if how == "top":
                return _set_path(data, [["format", "version", "adapters", "extra"][index % 4]], value)
            if how == "duplicate":
                entries.append(copy.deepcopy(entries[i]))
            if how == "drop":
                del entries[i]
            return data

        _json_edit(path, change)

    return f"manifest {how} entry {index} {field} = {value!r:.60}", apply


@st.composite
def _config_edit(draw, leaf: str):
    field = draw(
        st.sampled_from(
            [
                "r",
                "alpha",
                "rank_pattern",
                "alpha_pattern",
                "structure_pattern",
                "rank_groups",
                "decompose_factor",
                "target_modules",
                "exclude_modules",
                "exclude_key",
                "modules_to_save",
                "from_layer",
                "to_layer",
                "from_layers",
                "to_layers",
                "features",
                "conditioning_embedding_out_channels",
                "conditioning_channels",
                "use_dora",
                "lora_bias",
                "dropout",
                "p",
                "peft_type",
                "init_weights",
                "unknown_field",
            ]
        )
    )
    how = draw(st.sampled_from(["set", "set", "set", "delete", "truncate", "not a dict"]))
    value = draw(st.one_of(ODD_VALUES, st.sampled_from(["HCP_LORA", "HCP_LOHA", "HCP_LOKR", "HCP_SKIP", "LORA"])))
    fraction = draw(st.floats(0, 0.99))

    def apply(folder: str) -> None:
        path = os.path.join(folder, leaf, "adapter_config.json")
        if how == "truncate":
            _truncate(path, fraction)
        elif how == "not a dict":
            _json_edit(path, lambda data: [data])
        elif how == "delete":
            _json_edit(path, lambda data: {k: v for k, v in data.items() if k != field})
        else:
            _json_edit(path, lambda data: {**data, field: value})

    return f"config {leaf} {how} {field} = {value!r:.60}", apply


@st.composite
def _header_edit(draw, leaf: str):
    how = draw(
        st.sampled_from(
            ["shape", "shape", "transpose", "dtype", "dtype", "offsets", "rename", "delete", "metadata", "length"]
        )
    )
    index = draw(st.integers(0, 10_000))
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 2**24, 2**62, -1]), max_size=4))
    dtype = draw(st.sampled_from(SAFETENSORS_DTYPES))
    text = draw(st.sampled_from(ODD_STRINGS[:14]))
    number = draw(st.sampled_from([-8, -1, 1, 8, 2**40]))
    fraction = draw(st.floats(0, 0.99))
    truncate = draw(st.booleans())

    def apply(folder: str) -> None:
        path = os.path.join(folder, leaf, "adapter_model.safetensors")
        header, data = _read_header(path)
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[index % len(keys)]
        size_delta = 0
        if how == "shape":
            header[key]["shape"] = shape
        elif how == "transpose":  # the same size: safetensors takes it, the shapes differ
            header[key]["shape"] = header[key]["shape"][::-1]
        elif how == "dtype":
            header[key]["dtype"] = dtype
        elif how == "offsets":
            header[key]["data_offsets"][index % 2] += number
        elif how == "rename":
            header[key + text] = header.pop(key)
        elif how == "delete":
            del header[key]
        elif how == "metadata":
            header["__metadata__"] = {"format": text} if index % 2 else {"format": number}
        else:
            size_delta = number
        _write_header(path, header, data, size_delta)
        if truncate and how == "length":
            _truncate(path, fraction)

    return f"header {leaf} {how} {shape if how == 'shape' else dtype if how == 'dtype' else number}", apply


@st.composite
def _file_edit(draw, leaf: str):
    how = draw(
        st.sampled_from(["leaf link", "weights link", "config link", "manifest link", "remove weights", "pickle"])
    )

    def apply(folder: str) -> None:
        victim = os.path.join(os.path.dirname(folder), "victim")
        target = os.path.join(folder, leaf)
        if how == "leaf link":
            shutil.rmtree(target)
            os.symlink(os.path.join(victim, leaf), target)
        elif how in ("weights link", "config link"):
            name = "adapter_model.safetensors" if how == "weights link" else "adapter_config.json"
            os.remove(os.path.join(target, name))
            os.symlink(os.path.join(victim, leaf, name), os.path.join(target, name))
        elif how == "manifest link":
            os.remove(os.path.join(folder, "adapter_set.json"))
            os.symlink(os.path.join(victim, "adapter_set.json"), os.path.join(folder, "adapter_set.json"))
        elif how == "remove weights":
            os.remove(os.path.join(target, "adapter_model.safetensors"))
        else:
            os.rename(os.path.join(target, "adapter_model.safetensors"), os.path.join(target, "adapter_model.bin"))

    return f"files {leaf} {how}", apply


# -- the oracle -------------------------------------------------------------------------------------------


class Watch:
    """An audit hook that records file accesses while ``on``: a read under ``root`` outside ``allowed``, any write."""

    def __init__(self, root: str, allowed: str) -> None:
        self.root, self.allowed = os.path.realpath(root) + os.sep, os.path.realpath(allowed) + os.sep
        self.on, self.seen = False, []
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple) -> None:
        if not self.on:
            return
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
            )
            real = os.path.realpath(os.fsdecode(path)) if isinstance(path, (str, bytes)) else ""
            if writes:
                self.seen.append(f"write {path}")
            elif real.startswith(self.root) and not real.startswith(self.allowed):
                self.seen.append(f"read {path}")
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.symlink", "os.truncate"):
            self.seen.append(f"{event} {args[0]}")


def main(workdir: str, examples: int) -> None:
    start = time.perf_counter()
    source, victim = adapted_models(0), adapted_models(1)
    original = os.path.join(workdir, "original")
    entries = save_adapter(source, original)
    save_adapter(victim, os.path.join(workdir, "victim"))
    leaves = [e.subfolder for e in entries]
    saved = {
        e.subfolder: get_peft_model_state_dict(source.components[e.component], adapter_name=e.name) for e in entries
    }
    target = bare_models()
    for entry in load_adapter(target, original):  # once, so detaching leaves the bookkeeping as it will be
        detach(target.components[entry.component], entry.name)
    base = {name: model_snapshot(model) for name, model in target.components.items()}
    folder = os.path.join(workdir, "case")
    watch = Watch(workdir, folder)
    outcomes: Counter = Counter()
    unexpected: list[str] = []
    count = [0]
    accepted: list[str] = []

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(edit=edits(leaves))
    def case(edit) -> None:
        description, apply = edit
        count[0] += 1
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(original, folder, symlinks=True)
        apply(folder)
        problem = None
        watch.on, watch.seen = True, []
        try:
            loaded = load_adapter(target, folder)
        except PEFT_HCP_ERRORS as exc:
            watch.on = False
            outcomes[type(exc).__name__] += 1
        except Exception as exc:  # noqa: BLE001 - the point: record what should not escape
            watch.on = False
            problem = f"{type(exc).__name__}: {str(exc)[:300]}"
        else:
            watch.on = False
            outcomes["loaded"] += 1
            accepted.append(description)
            for entry in loaded:
                module = target.components[entry.component]
                got = get_peft_model_state_dict(module, adapter_name=entry.name)
                want = saved.get(entry.subfolder, {})
                if got.keys() != want.keys() or any(not torch.equal(got[k], want[k]) for k in got):
                    problem = problem or f"loaded {entry} differs from what its folder was saved from"
                detach(module, entry.name)
        if watch.seen:
            problem = problem or f"file access while loading: {watch.seen[:3]}"
        for name, model in target.components.items():
            try:
                assert_model_unchanged(base[name], model)
            except AssertionError as exc:
                problem = problem or f"{name} changed: {str(exc)[:200]}"
                for adapter in list(getattr(model, "peft_config", None) or {}):
                    detach(model, adapter)
        if problem:
            unexpected.append(f"{description} -> {problem}")

    ready = time.perf_counter()
    case()
    seconds = {"setup": round(ready - start, 1), "cases": round(time.perf_counter() - ready, 1)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    report = {"examples": count[0], "outcomes": dict(outcomes), "peak_mib": peak, "seconds": seconds}
    report.update(unexpected_count=len(unexpected), unexpected=unexpected[:20], loaded=accepted[:30])
    print(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]))
