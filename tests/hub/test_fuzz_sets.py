"""Fuzzing adapter sets: random edits of a valid set load equal to the original or are refused with a peft-hcp error.

The cases (``tests/hub/fuzz_sets.py``: edits of the manifest, the adapter configs, the safetensors headers and the
set's files) run in a child process under a 3 GiB address-space limit, so a case that allocates what a file claims
instead of what it holds fails there. ``EXAMPLES`` cases run, derandomized: the same ones on every run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from tests.helpers import ROOT


pytest.importorskip("hypothesis")  # the `test` extra

#: the number of edited sets loaded (about 0.2 s each on one core)
EXAMPLES = 150
ADDRESS_SPACE = 3 * 2**30


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_random_edits_of_a_set_load_whole_or_are_refused_leaving_the_models_unchanged(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tests.hub.fuzz_sets", str(tmp_path), str(EXAMPLES)],
        cwd=tmp_path,  # whatever hypothesis might write lands in the test's folder
        env={**os.environ, "PYTHONPATH": ROOT},
        preexec_fn=_limit_address_space,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["examples"] == EXAMPLES
    assert report["unexpected_count"] == 0, "\n".join(report["unexpected"])
    outcomes = report["outcomes"]
    assert outcomes.get("loaded", 0) > 0 and outcomes.get("CheckpointError", 0) > EXAMPLES // 2, outcomes
    assert report["peak_mib"] < 2048, report
