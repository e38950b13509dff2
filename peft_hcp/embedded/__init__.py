"""The embedded default: a tiny Stable-Diffusion-shaped pipeline built locally, with no download.

Demos, tests and benchmarks build their models here (:mod:`.models`); the CLI trains on
:func:`.pipeline.embedded_pipeline` when no ``pretrained_model`` is given.
"""

from peft_hcp.embedded.models import (
    sd15_unet,
    tiny_clip_text_model,
    tiny_unet,
    tiny_vae,
    unet_inputs,
)
from peft_hcp.embedded.pipeline import (
    default_resolution,
    embedded_pipeline,
    load_pipeline,
    tokenizer_path,
)


__all__ = [
    "default_resolution",
    "embedded_pipeline",
    "load_pipeline",
    "sd15_unet",
    "tiny_clip_text_model",
    "tiny_unet",
    "tiny_vae",
    "tokenizer_path",
    "unet_inputs",
]
