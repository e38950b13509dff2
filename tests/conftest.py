"""Shared fixtures: tiny real models built from configs (nothing is downloaded), one torch thread."""

import pytest
import torch

import peft_hcp  # noqa: F401  (registers the peft-hcp types with PEFT)
from peft_hcp.embedded import tiny_clip_text_model, tiny_unet, unet_inputs


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
