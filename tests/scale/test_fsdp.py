"""FSDP2 (``fully_shard``) on CPU with 2 processes (gloo): adapters of every family train sharded as in one
process, each rank holds half of the frozen base, and the adapter saved collectively loads in one process.

The 2-process runs live in ``fsdp_library_worker.py`` (a subprocess with a timeout: a hung collective fails the
test). Tolerances: the two ranks average the gradients of two half batches, which differs from the whole
batch's gradient by rounding only (~1e-7 on the weights after AdamW with eps 1e-4).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import ROOT, run_python


WORKER = os.path.join(ROOT, "tests", "scale", "fsdp_library_worker.py")


def run_worker(kind: str, out: str) -> dict:
    done = run_python(f"import runpy; runpy.run_path({WORKER!r}, run_name='__main__')", kind, out, timeout=280)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["lora", "loha", "controlnet"])
def test_two_process_fsdp2_matches_one_process_and_saves_a_plain_adapter(kind, tmp_path):
    report = run_worker(kind, str(tmp_path))
    for rank in report["ranks"]:  # each rank holds about half of the frozen base
        assert rank["frozen_whole"] == rank["frozen_before"] > 0
        assert 0.45 < rank["frozen_held"] / rank["frozen_whole"] < 0.55
    if kind == "controlnet":  # the plugin's trainable copy of the encoder is sharded per block too
        assert all(rank["copy_blocks_sharded"] for rank in report["ranks"])
    assert report["moved"] > 1e-3  # training changed the adapter, so the comparison below means something
    assert report["weight_diff"] < 2e-6
    assert report["output_diff"] < 2e-5
    # adapter-only, whole tensors: one adapter file, every key an adapter's, as many as the adapter has tensors
    assert all("hcp_" in key for key in report["saved_keys"])
    assert len(report["saved_keys"]) == report["adapter_keys"]
    assert sum(f.endswith(".safetensors") for f in report["files"]) == 1
