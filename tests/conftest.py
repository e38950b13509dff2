"""Shared fixtures: tiny real models built from configs (nothing is downloaded)."""

import pytest
import torch

import peft_hcp  # noqa: F401  (registers the peft-hcp types with PEFT)
from peft_hcp.embedded.models import tiny_clip_text_model, tiny_unet, unet_inputs


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


def unet_out(model, batch) -> torch.Tensor:
    """The UNet's noise prediction for ``batch``, without gradients."""
    with torch.no_grad():
        return model(*batch).sample
