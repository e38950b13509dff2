"""Helpers shared by the tests: model outputs, hook counts, the tiny pipeline, a fresh Python process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp.embedded import default_resolution, embedded_pipeline


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a cat"


def unet_out(model, batch) -> torch.Tensor:
    """The UNet's noise prediction for ``batch``, without gradients."""
    with torch.no_grad():
        return model(*batch).sample


def hook_count(model: nn.Module) -> int:
    """How many forward (pre-)hooks the modules of ``model`` carry."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@dataclass
class ModelSnapshot:
    """What a refused operation must leave unchanged (see :func:`assert_model_unchanged`)."""

    run: Optional[Callable[[nn.Module], torch.Tensor]]
    state: dict[str, torch.Tensor]
    tree: list[tuple[str, str]]
    requires_grad: dict[str, bool]
    hooks: int
    attributes: list[str]
    adapters: Optional[list[str]]
    peft_loaded: Optional[bool]
    layer_adapters: list[tuple[str, list[str], list[str], bool]]
    output: Optional[torch.Tensor]


def model_snapshot(model: nn.Module, run: Optional[Callable[[nn.Module], torch.Tensor]] = None) -> ModelSnapshot:
    """Record ``model``'s state dict, module tree, trainability, hooks, attributes, adapter bookkeeping (the
    model's configs, each tuner layer's active, merged and disabled adapters) and (given ``run``) the output
    ``run(model)``."""
    config = getattr(model, "peft_config", None)
    return ModelSnapshot(
        run=run,
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        tree=[(name, type(m).__name__) for name, m in model.named_modules()],
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        hooks=hook_count(model),
        attributes=sorted(vars(model)),
        adapters=None if config is None else list(config),
        peft_loaded=getattr(model, "_hf_peft_config_loaded", None),
        layer_adapters=[
            (name, list(m.active_adapters), list(m.merged_adapters), m.disable_adapters)
            for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer)
        ],
        output=None if run is None else run(model),
    )


def assert_model_unchanged(before: ModelSnapshot, model: nn.Module) -> None:
    """Assert that ``model`` is exactly as when ``before`` was taken (bit-for-bit state and output)."""
    after = model_snapshot(model, before.run)
    assert after.tree == before.tree
    assert after.state.keys() == before.state.keys()
    for key, value in before.state.items():  # exactly equal, NaNs included
        torch.testing.assert_close(after.state[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert after.requires_grad == before.requires_grad
    assert after.hooks == before.hooks
    assert after.attributes == before.attributes, set(after.attributes) ^ set(before.attributes)
    assert (after.adapters, after.peft_loaded) == (before.adapters, before.peft_loaded)
    assert after.layer_adapters == before.layer_adapters
    if before.run is not None:
        torch.testing.assert_close(after.output, before.output, rtol=0, atol=0, equal_nan=True)


def tiny_pipeline() -> StableDiffusionPipeline:
    """The package's embedded tiny pipeline, with a DDIM scheduler and no progress bars."""
    pipe = embedded_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_out(pipe, steps: int = 2) -> torch.Tensor:
    """Latents of a short generation from a fixed seed."""
    size = default_resolution(pipe)
    with torch.no_grad():
        return pipe(
            PROMPT,
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images


def run_python(
    script: str,
    *args: str,
    check: bool = True,
    timeout: float = 300,
    env: Optional[dict] = None,
    cwd: Optional[str] = None,
) -> subprocess.CompletedProcess:
    """Run ``script`` (dedented) in a fresh interpreter with the repository importable and one torch thread.

    The process is killed after ``timeout`` seconds, so a hang fails the test instead of the suite. With
    ``check``, a non-zero exit fails the test with the end of the child's stderr.
    """
    prelude = f"import sys, torch; sys.path.insert(0, {ROOT!r}); torch.set_num_threads(1)\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def lycoris_network(tensors: dict[str, torch.Tensor], model: nn.Module):
    """LyCORIS's own network built on ``model`` from a kohya/LyCORIS file's tensors (skips without lycoris-lora)."""
    wrapper = pytest.importorskip("lycoris.wrapper")
    names = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in tensors.items()}
    network, _ = wrapper.create_lycoris_from_weights(1.0, None, model, weights_sd=names)
    assert len(network.loras) == len({k.split(".")[0] for k in tensors})
    return network
