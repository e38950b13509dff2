"""Helpers shared by the tests: model outputs, hook counts, the tiny pipeline, a fresh Python process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Optional

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
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


def snapshot(model: nn.Module) -> tuple:
    """Module tree, state dict, requires_grad, attributes and hook count: what a refused attach must not change."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    return [n for n, _ in model.named_modules()], state, [p.requires_grad for p in model.parameters()], sorted(vars(model)), hooks


def assert_same_snapshot(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[2:] == after[2:]
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
