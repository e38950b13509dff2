"""``peft-hcp pretrain-base``: pre-train the embedded tiny pipeline and write its weights (see
:mod:`peft_hcp.embedded.pretrain`).

Trains the VAE, then the UNet with the CLIP text encoder, from the random weights of the untrained tiny
pipeline, and writes them (fp16, about 2 MB) to the package's ``embedded/assets/base.safetensors``, or ``--out``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class PretrainPlan:
    """The hyper-parameters of :func:`~peft_hcp.embedded.pretrain.pretrain` (every field is a ``--option``)."""

    seed: int = 0
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    pool: int = 8192  # images whose latents stage 2 draws its batches from
    steps: int = 2400
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.997
    threads: int = 1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain-base",
        help="pre-train the embedded tiny pipeline (writes the shipped base weights)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--out", default=None, help="where to write the weights (default: the package's asset)")
    for spec in fields(PretrainPlan):
        parser.add_argument(f"--{spec.name.replace('_', '-')}", type=type(spec.default), default=spec.default)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peft_hcp.embedded.pipeline import base_weights_path, load_base_weights, untrained_pipeline
    from peft_hcp.embedded.pretrain import measure, pretrain

    plan = PretrainPlan(**{spec.name: getattr(args, spec.name) for spec in fields(PretrainPlan)})
    out = args.out or base_weights_path()
    began = time.perf_counter()
    pretrain(plan, out)
    minutes = (time.perf_counter() - began) / 60
    shipped = untrained_pipeline()  # measure what was written (fp16), as embedded_pipeline() loads it
    shipped.set_progress_bar_config(disable=True)
    load_base_weights(shipped, out)
    print(f"{measure(shipped)}\nbase weights written to {out} in {minutes:.1f} min")
    return 0
