"""Shared fixtures: tiny real models built from configs (nothing is downloaded), one torch thread."""

import os
import shutil
import tempfile


# torch.compile keeps compiled kernels in a cache every process of the user shares (/tmp/torchinductor_<user>):
# a run killed while writing one left a truncated .so there, and the next run's compile test failed on it
# ("file too short"). The suite always compiles into a folder of its own (child processes inherit it): torch
# itself writes the default into TORCHINDUCTOR_CACHE_DIR when it first looks, so a value found here may not
# be a caller's choice.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peft-hcp-inductor-")

import pytest  # noqa: E402
import torch  # noqa: E402

import peft_hcp  # noqa: F401, E402  (registers the peft-hcp types with PEFT)
from peft_hcp.embedded import tiny_clip_text_model, tiny_unet, unet_inputs  # noqa: E402


_INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (a 2-step run: 13 s -> 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture
def unet_batch():
    return unet_inputs()


@pytest.fixture
def text_encoder():
    return tiny_clip_text_model()


@pytest.fixture
def token_ids():
    return torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
