"""``peft-hcp train CONFIG [key=value ...]``: train the plugins of a config (see :mod:`peft_hcp.train`)."""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train plugins from a config file",
        description="Train the plugin_unet / plugin_TE plugins of CONFIG on a Stable Diffusion pipeline "
        "(the embedded tiny one unless pretrained_model=PATH). Overrides are Hydra-style key=value.",
    )
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. steps=20 data=DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peft_hcp.adapters import register_bundled
    from peft_hcp.train.settings import load_settings
    from peft_hcp.train.trainer import LOG_NAME, train

    register_bundled()
    result = train(load_settings(args.config, args.overrides))
    if not result.main_process:
        return 0
    if result.score is not None:
        print(result.score)
        print("; ".join(map(str, result.details)))
    print(
        f"eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}, "
        f"{result.it_per_s:.2f} it/s, {result.seconds:.0f} s; log: {os.path.join(result.output_dir, LOG_NAME)}"
    )
    print(f"samples (adapters off | on): {result.samples[-1]}; adapters: {result.checkpoint}")
    return 0
