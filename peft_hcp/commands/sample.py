"""``peft-hcp sample --adapter DIR prompt=... [key=value ...]``: render images with a saved adapter.

``DIR`` is a training checkpoint or any peft-hcp adapter set / PEFT adapter folder. The base pipeline is
``pretrained_model=PATH`` if given, else the one the checkpoint was trained on (recorded in its
``train_state.json``), else the embedded tiny pipeline. Writes the adapter-on images and an off/on grid.
A plugin that takes a condition image (ControlNet) needs ``cond=IMAGE``, used as is: the kind of image it trained
on (of the generated shapes a silhouette, of a data folder an edge map).
"""

from __future__ import annotations

import argparse
import json
import os


SETTINGS = {
    "prompt": None,
    "pretrained_model": None,
    "seeds": [0],
    "steps": 20,
    "guidance_scale": 4.0,
    "resolution": None,
    "cond": None,
    "out": "peft-hcp-samples",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="render images with a saved adapter",
        description="Load a saved adapter (all plugin kinds) onto the pipeline and write images. Settings are "
        f"key=value: {', '.join(SETTINGS)}.",
    )
    parser.add_argument("--adapter", required=True, help="checkpoint / adapter folder")
    parser.add_argument("settings", nargs="*", help="key=value, e.g. prompt='a red circle' seeds=[0,1,2]")
    parser.set_defaults(func=run)


def parse_settings(items: list[str]) -> dict:
    from omegaconf import OmegaConf

    for item in items:
        if "=" not in item:
            raise ValueError(f"Setting {item!r} is not of the form key=value.")
    given = OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=True)
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown}; the settings are {sorted(SETTINGS)}.")
    settings = {**SETTINGS, **given}
    if not settings["prompt"]:
        raise ValueError("Give at least one prompt: prompt='a red circle' (or prompt=[one,two]).")
    if isinstance(settings["prompt"], str):
        settings["prompt"] = [settings["prompt"]]
    if isinstance(settings["seeds"], int):
        settings["seeds"] = [settings["seeds"]]
    return settings


def run(args: argparse.Namespace) -> int:
    print("\n".join(sample(args.adapter, parse_settings(args.settings))))
    return 0


def sample(adapter: str, settings: dict) -> list[str]:
    """Render ``settings['prompt']`` x ``settings['seeds']`` with the adapter; returns the written files."""
    from PIL import Image

    from peft_hcp.adapter_set import load_adapter
    from peft_hcp.adapters import register_bundled
    from peft_hcp.embedded.pipeline import default_resolution, load_pipeline
    from peft_hcp.train.checkpoint import STATE_NAME
    from peft_hcp.train.data import to_tensor
    from peft_hcp.train.sampling import grid, needs_condition, render_off_on

    register_bundled()
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"--adapter {adapter!r} is not a folder.")
    recorded = {}
    if os.path.isfile(os.path.join(adapter, STATE_NAME)):
        with open(os.path.join(adapter, STATE_NAME), encoding="utf-8") as handle:
            recorded = json.load(handle)
    pipe = load_pipeline(settings["pretrained_model"] or recorded.get("pretrained_model"))
    pipe.set_progress_bar_config(disable=True)
    load_adapter(pipe, adapter)
    resolution = settings["resolution"] or default_resolution(pipe)
    cond = None
    if settings["cond"] is not None and not needs_condition(pipe):
        raise ValueError("cond= was given, but no plugin of this adapter takes a condition image.")
    if needs_condition(pipe):
        if settings["cond"] is None:
            raise ValueError(
                "This adapter takes a condition image: give cond=IMAGE, of the kind it trained on "
                "(a silhouette, an edge map)."
            )
        with Image.open(settings["cond"]) as image:
            cond = ((to_tensor(image, resolution) + 1) / 2)[None].repeat(len(settings["prompt"]), 1, 1, 1)
    prompts, seeds = settings["prompt"], settings["seeds"]
    off, on = render_off_on(pipe, prompts, seeds, settings["steps"], settings["guidance_scale"], cond, resolution)
    out = settings["out"]
    os.makedirs(out, exist_ok=True)
    paths = []
    for index, image in enumerate(on):
        paths.append(os.path.join(out, f"{index:03d}.png"))
        image.save(paths[-1])
    paths.append(os.path.join(out, "grid.png"))
    grid(off, on, prompts, os.path.basename(os.path.normpath(adapter))).save(paths[-1])
    return paths
