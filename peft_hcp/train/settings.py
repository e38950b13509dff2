"""Run settings: a YAML file in the seed's syntax, merged over defaults, with ``key=value`` overrides.

The file is read with OmegaConf (the config library of Hydra): ``${...}`` interpolation works, and
overrides on the command line use Hydra's dotted ``key=value`` form (``steps=20``,
``plugin_unet.lora1.lr=1e-3``, ``sample.prompts=[a red circle]``). A key that is not a setting is an
error, so typos do not pass silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peft_hcp.train.plugins import SECTIONS

DEFAULTS: dict[str, Any] = {
    "pretrained_model": None,  # a local diffusers SD folder; None = the embedded tiny pipeline
    "data": None,  # a folder of images with .txt captions; None = the generated shapes
    "data_size": 64,  # items of the generated shapes dataset
    "resolution": None,  # image size; None = what the UNet was built for
    "output_dir": None,  # None = runs/<config file name>
    "seed": 0,
    "steps": 60,  # optimizer steps
    "batch_size": 4,  # per process, per micro-batch
    "grad_accum": 1,
    "mixed_precision": "no",  # no | bf16 | fp16
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "save_every": 20,  # checkpoint every N steps (and at the end)
    "sample_every": 0,  # also render samples every N steps (0 = only at the end)
    "resume": True,  # continue from the newest checkpoint in output_dir
    "log_every": 1,
    "caption_dropout": 0.0,  # fraction of captions replaced by "" (for classifier-free guidance)
    "sample": {
        "prompts": ["a large red circle on a blue background", "a small yellow square on a black background"],
        "seeds": [0, 1],
        "steps": 10,
        "guidance_scale": 1.0,
    },
    "plugin_unet": {},
    "plugin_TE": {},
}


class SettingsError(ValueError):
    """A config file or override that does not describe a run."""


def load_settings(path: Optional[str], overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the file at ``path`` (if any), then ``overrides``; validated."""
    settings = OmegaConf.create(DEFAULTS)
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Config file {path!r} does not exist.")
        try:
            layers.append(OmegaConf.load(path))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise SettingsError(f"{path}: not valid YAML: {where}{exc.problem or exc.context}") from exc
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
            raise SettingsError(f"{path}: not a readable YAML config: {' '.join(str(exc).split())}") from exc
    for item in overrides:
        if "=" not in item:
            raise SettingsError(f"Override {item!r} is not of the form key=value.")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise SettingsError(f"Bad override: {exc}") from exc
    for layer in layers:
        unknown = sorted(set(layer) - set(DEFAULTS))
        if unknown:
            raise SettingsError(f"Unknown setting(s) {unknown}; the settings are {sorted(DEFAULTS)}.")
        settings = OmegaConf.merge(settings, layer)
    if settings.output_dir is None:
        name = os.path.splitext(os.path.basename(path))[0] if path else "default"
        settings.output_dir = os.path.join("runs", name)
    _check(settings)
    return settings


def _check(settings: DictConfig) -> None:
    for key in ("steps", "batch_size", "grad_accum", "data_size"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingsError(f"{key} must be a positive integer, got {value!r}.")
    for key in ("save_every", "sample_every", "log_every"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 0:
            raise SettingsError(f"{key} must be a non-negative integer, got {settings[key]!r}.")
    if settings.mixed_precision not in ("no", "bf16", "fp16"):
        raise SettingsError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {settings.mixed_precision!r}.")
    if not any(settings[section] for section in SECTIONS):
        raise SettingsError(f"Nothing to train: the config has no plugins under {' or '.join(SECTIONS)}.")
