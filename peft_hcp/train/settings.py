"""Run settings: a YAML file in the seed's syntax, merged over defaults, with ``key=value`` overrides.

The file is read with OmegaConf (the config library of Hydra) over the structured defaults of
:class:`RunSettings`: ``${...}`` interpolation works, overrides on the command line use Hydra's dotted
``key=value`` form (``steps=20``, ``plugin_unet.lora1.lr=1e-3``, ``sample.prompts=[a red circle]``), and a
key that is not a setting, or a value of the wrong type, is an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peft_hcp.errors import PeftHcpError
from peft_hcp.quant import SCHEMES
from peft_hcp.train.concept import PALETTE_NAMES, named_in
from peft_hcp.train.data import CONCEPT_COLOUR, HELD_OUT_KINDS
from peft_hcp.train.plugins import SECTIONS


#: The default sample prompts: the held-out concept of the generated shapes, which a run on them teaches,
#: in the kinds no training caption pairs it with.
CONCEPT_PROMPTS = [f"a {size} {CONCEPT_COLOUR} {shape}" for size, shape in HELD_OUT_KINDS]
#: The same kinds in blue and green, the palette colours nearest the concept's, and white, the nearest to a pale cyan:
#: where the concept would leak first.
LEAK_PROMPTS = [
    f"a {size} {colour} {shape}" for colour, (size, shape) in zip(("blue", "green", "white"), HELD_OUT_KINDS)
]


@dataclass
class SampleSettings:
    """The fixed prompts and seeds rendered with the adapters off and on (and scored, on the generated
    shapes: :mod:`peft_hcp.train.concept`)."""

    prompts: list[str] = field(default_factory=lambda: list(CONCEPT_PROMPTS))
    leak_prompts: list[str] = field(default_factory=lambda: list(LEAK_PROMPTS))  # name other colours than the concept's
    seeds: list[int] = field(default_factory=lambda: list(range(12)))
    conditions: int = 6  # a conditioned run on the generated shapes: held-out items whose conditions it samples
    steps: int = 10  # DDIM steps
    guidance_scale: float = 4.0


@dataclass
class RunSettings:
    """Every setting of a run, with its default; a key that is not here is an error."""

    pretrained_model: Optional[str] = None  # a local diffusers SD folder; None = the embedded tiny pipeline
    data: Optional[str] = None  # a folder of images with .txt captions; None = the generated shapes
    data_size: int = 64  # items of the generated shapes dataset
    eval_size: int = 8  # held-out items of the eval loss (generated anew, or the last tenth of a data folder)
    resolution: Optional[int] = None  # image size; None = what the UNet was built for
    output_dir: Optional[str] = None  # None = runs/<config file name>
    seed: int = 0
    threads: int = 0  # torch's CPU threads; 0 = one for the embedded tiny pipeline (more only contend), else torch's
    steps: int = 60  # optimizer steps
    batch_size: int = 4  # per process, per micro-batch
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    quantize: Optional[str] = None  # the UNet's Linears: nf4 | fp4 | int8 | fp8 | ... (peft_hcp.quant.SCHEMES)
    gradient_checkpointing: bool = False  # recompute the UNet's (and a trained text encoder's) blocks in backward
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    save_every: int = 20  # checkpoint every N steps (and at the end)
    sample_every: int = 0  # also render samples every N steps (0 = only at the end)
    resume: bool = True  # continue from the newest checkpoint in output_dir
    log_every: int = 1
    caption_dropout: float = 0.0  # fraction of captions replaced by "" (for classifier-free guidance)
    sample: SampleSettings = field(default_factory=SampleSettings)
    plugin_unet: dict[str, Any] = field(default_factory=dict)
    plugin_TE: dict[str, Any] = field(default_factory=dict)


class SettingsError(PeftHcpError, ValueError):
    """A config file or override that does not describe a run."""


def load_settings(path: Optional[str], overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the file at ``path`` (if any), then ``overrides``; validated.

    The defaults are :class:`RunSettings` as an OmegaConf structured config, so an unknown key or a value
    of the wrong type is refused by OmegaConf itself, naming the key.
    """
    settings = OmegaConf.structured(RunSettings)
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Config file {path!r} does not exist.")
        try:
            layers.append((path, OmegaConf.load(path)))
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
            raise SettingsError(f"{path}: {_yaml_problem(exc)}") from exc
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"Override {item!r} is not of the form key=value.")
        try:
            layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
            raise SettingsError(f"Override {item!r}: {_yaml_problem(exc)}") from exc
    for source, layer in layers:
        try:
            settings = OmegaConf.merge(settings, layer)
        except OmegaConfBaseException as exc:
            raise SettingsError(f"{source}: {str(exc).splitlines()[0]}") from exc
    if settings.output_dir is None:
        name = os.path.splitext(os.path.basename(path))[0] if path else "default"
        settings.output_dir = os.path.join("runs", name)
    _check(settings)
    return settings


def _yaml_problem(exc: Exception) -> str:
    """One line saying what is wrong with a YAML text (where, for a YAML syntax error)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return f"not valid YAML: {where}{exc.problem or exc.context}"
    return f"not readable YAML: {' '.join(str(exc).split())}"


def _check(settings: DictConfig) -> None:
    for key in ("steps", "batch_size", "grad_accum", "data_size"):
        if settings[key] < 1:
            raise SettingsError(f"{key} must be a positive integer, got {settings[key]!r}.")
    for key in ("save_every", "sample_every", "log_every", "eval_size", "threads"):
        if settings[key] < 0:
            raise SettingsError(f"{key} must be a non-negative integer, got {settings[key]!r}.")
    if settings.mixed_precision not in ("no", "bf16", "fp16"):
        raise SettingsError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {settings.mixed_precision!r}.")
    if settings.quantize is not None and settings.quantize not in SCHEMES:
        raise SettingsError(f"quantize must be one of {', '.join(SCHEMES)}, got {settings.quantize!r}.")
    if settings.sample.conditions < 2:
        raise SettingsError(
            f"sample.conditions must be at least 2 (the chance level pairs each with another one), "
            f"got {settings.sample.conditions!r}."
        )
    for prompt in settings.sample.leak_prompts if settings.data is None else ():
        if named_in(prompt, PALETTE_NAMES) in (None, CONCEPT_COLOUR):
            raise SettingsError(
                f"sample.leak_prompts: {prompt!r} names no palette colour but {CONCEPT_COLOUR!r}; the leak rate "
                f"counts how many samples of prompts naming other colours are drawn {CONCEPT_COLOUR}."
            )
    if not any(settings[section] for section in SECTIONS):
        raise SettingsError(f"Nothing to train: the config has no plugins under {' or '.join(SECTIONS)}.")
