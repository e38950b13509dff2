"""The contract matrix's cases, generated from peft-hcp's registry: at least one per registered type.

A case is the type's config (its layer selectors and own fields, random weights), the tiny host it attaches
to, the inputs it takes through :func:`peft_hcp.feed`, and a config that host refuses. The case of a type
whose layers a rule cannot guess is written in :data:`CASES`; every other type gets one from its kind:

- single-layer plugin: the self-attention layers of the tiny SD UNet's down block, and ``conv_in`` when the
  plugin wraps ``Conv2d`` layers;
- patch: the whole UNet (every module of the patch's ``wrapable_classes``);
- from -> to plugin: each attention block's ``proj_in`` input to its ``proj_out`` input.

A many -> many type (a ControlNet: its layers depend on the host), or a type taking an input its host cannot
make, gets no case by rule; ``test_every_registered_type_has_a_case`` fails naming it until it is given one.

Refusals: a single-layer or patch config also selects the host's ``wrong_layer`` (on the UNet: a grouped
``conv_out``, last in model order, which the low-rank kinds refuse after wrapping every other layer and the
other kinds refuse by type); a from -> to config pairs its from-layers with that one layer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

import peft_hcp
from peft_hcp import HcpPatchConfig, HcpPluginConfig, HcpSingleConfig, SinglePluginBlock
from peft_hcp.base.config import HcpConfig
from peft_hcp.base.feed import fed_plugins
from peft_hcp.embedded import tiny_clip_text_model, tiny_unet, unet_inputs
from peft_hcp.registry import registered_types
from tests.controlnet_hosts import HOSTS, control


@dataclass(frozen=True, eq=False)
class Host:
    """A tiny model, its call on fixed inputs, the values it can feed, and how to make it refuse."""

    name: str
    build: Callable[[], nn.Module]
    call: Callable[[nn.Module], torch.Tensor]
    #: fed input key -> its value for a seed
    feeds: dict[str, Callable[[int], torch.Tensor]]
    #: a layer of ``refusing()`` the plugins of most kinds cannot take
    wrong_layer: str
    refusing: Optional[Callable[[], nn.Module]] = None
    #: whether the model's own ``add_adapter`` (diffusers') takes a peft-hcp config
    has_add_adapter: bool = True

    def build_refusing(self) -> nn.Module:
        return (self.refusing or self.build)()


def grouped_unet() -> nn.Module:
    """The tiny UNet with a grouped ``conv_out``, which the low-rank kinds refuse."""
    unet = tiny_unet()
    torch.manual_seed(0)
    unet.conv_out = nn.Conv2d(32, 4, 3, padding=1, groups=4)
    return unet


UNET_INPUTS = unet_inputs()
TOKENS = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))


def dit_host(kind: str) -> Host:
    """A DiT of :mod:`tests.controlnet_hosts`, fed control latents."""
    build, make_inputs, _ = HOSTS[kind]
    inputs = make_inputs()
    return Host(
        kind, build, lambda model: model(**inputs).sample, {"cond": lambda seed: control(kind, seed=seed)}, "proj_out"
    )


UNET = Host(
    "unet",
    tiny_unet,
    lambda model: model(*UNET_INPUTS).sample,
    {"cond": lambda seed: torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))},
    wrong_layer="conv_out",
    refusing=grouped_unet,
)
TEXT_ENCODER = Host(
    "text_encoder",
    tiny_clip_text_model,
    lambda model: model(TOKENS).last_hidden_state,
    {},
    wrong_layer="final_layer_norm",
    has_add_adapter=False,  # transformers' add_adapter asks for a newer PEFT
)
SD3 = dit_host("sd3")
FLUX = dit_host("flux")


@dataclass(frozen=True)
class Spec:
    """How a type is tried: on ``host`` with ``fields``; ``refused`` replaces fields so the host refuses it
    (``None``: derived from the kind)."""

    host: Host
    fields: dict
    refused: Optional[dict] = None
    variant: str = ""


#: the self-attention of the UNet's down block (4 Linear layers): each extra layer costs a trace ~0.2 s
ATTENTION = ["re:down_blocks.*attn1$"]

#: the types a rule does not cover (or not enough): type name -> its cases
CASES: dict[str, list[Spec]] = {
    "hcp_lora": [
        # Linear and Conv2d hosts; a rank given as a fraction of each host's outputs (saved and loaded as such)
        Spec(UNET, {"target_modules": [*ATTENTION, "conv_in"], "r": 0.5, "dropout": 0.1}),
        Spec(UNET, {"target_modules": [*ATTENTION, "conv_in"], "use_dora": True, "dropout": 0.1}, variant="dora"),
        Spec(
            TEXT_ENCODER, {"target_modules": ["re:.*self_attn$", "re:.*mlp$"], "dropout": 0.1}, variant="text_encoder"
        ),
    ],
    "hcp_controlnet": [
        Spec(UNET, {"conditioning_embedding_out_channels": [8, 16]}, refused={"to_layers": ["mid_block"]}),
    ],
    "hcp_sd3_controlnet": [Spec(SD3, {"num_layers": 2}, refused={"to_layers": ["proj_out"]})],
    "hcp_flux_controlnet": [Spec(FLUX, {"num_layers": 2, "num_single_layers": 2}, refused={"to_layers": ["proj_out"]})],
}


def spec_by_kind(config_cls: type[HcpConfig]) -> Optional[Spec]:
    """The case of a type its kind gives (see the module docstring); ``None`` for a many -> many type."""
    if issubclass(config_cls, HcpPatchConfig):  # before single: a patch config is a single-layer one
        return Spec(UNET, {"target_modules": [""]})
    if issubclass(config_cls, HcpSingleConfig):
        wraps_conv = any(issubclass(nn.Conv2d, cls) for cls in config_cls.plugin_cls.wrapable_classes)
        return Spec(UNET, {"target_modules": [*ATTENTION, "conv_in"] if wraps_conv else ATTENTION})
    if issubclass(config_cls, HcpPluginConfig):
        return Spec(UNET, {"from_layer": ["re:.*proj_in$"], "to_layer": ["prehook:re:.*proj_out$"]})
    return None


def refused_by_kind(config_cls: type[HcpConfig], spec: Spec) -> Optional[dict]:
    if issubclass(config_cls, HcpSingleConfig):
        return {"target_modules": [*spec.fields["target_modules"], spec.host.wrong_layer]}
    if issubclass(config_cls, HcpPluginConfig):
        return {"to_layer": [f"prehook:{spec.host.wrong_layer}"]}
    return None


@dataclass(frozen=True)
class Case:
    """One row of the matrix: a registered type tried on a host."""

    id: str
    config_cls: type[HcpConfig]
    host: Host
    fields: dict = field(repr=False)
    refused_fields: dict = field(repr=False)

    @property
    def type_name(self) -> str:
        return self.config_cls.type_name

    @property
    def input_keys(self) -> tuple[str, ...]:
        return self.config_cls.plugin_cls.input_keys

    @property
    def mergeable(self) -> bool:
        """A single-layer block folds into its host when it defines ``get_delta_weight`` or ``merged_weight``."""
        block = self.config_cls.plugin_cls
        return issubclass(block, SinglePluginBlock) and (
            block.get_delta_weight is not SinglePluginBlock.get_delta_weight
            or block.merged_weight is not SinglePluginBlock.merged_weight
        )

    def config(self) -> HcpConfig:
        """The case's config with random weights, so that the adapter acts from the start."""
        return self.config_cls(**{**self.fields, "init_weights": False})

    def refused_config(self) -> HcpConfig:
        return self.config_cls(**{**self.fields, **self.refused_fields})

    def inputs(self, seed: int = 1) -> dict[str, torch.Tensor]:
        return {key: self.host.feeds[key](seed) for key in self.input_keys}

    def run(self, model: nn.Module, seed: int = 1) -> torch.Tensor:
        """The model's output in eval mode (a new adapter's dropout is in training mode, as in PEFT), without
        gradients, fed the inputs its plugins take (none on a bare host)."""
        model.eval()
        keys = sorted({key for plugin in fed_plugins(model) for key in plugin.input_keys})
        feeding = peft_hcp.feed(model, **{key: self.host.feeds[key](seed) for key in keys}) if keys else nullcontext()
        with torch.no_grad(), feeding:
            return self.host.call(model)


def matrix_types() -> dict[str, type[HcpConfig]]:
    """Every registered type but those another test module registers for its own use (with inputs of its own;
    taking them would make the matrix depend on which test files pytest collected)."""
    return {
        name: config_cls
        for name, config_cls in registered_types().items()
        if not (config_cls.__module__.startswith("tests.") and not config_cls.__module__.startswith(__package__))
    }


def cases_of(type_name: str, config_cls: type[HcpConfig]) -> tuple[list[Case], Optional[str]]:
    """The type's cases, or why it has none."""
    by_kind = spec_by_kind(config_cls)
    specs = CASES.get(type_name) or ([] if by_kind is None else [by_kind])
    if not specs:
        return [], "a many -> many plugin's layers depend on its host: add its case to CASES"
    found = []
    for spec in specs:
        refused = spec.refused if spec.refused is not None else refused_by_kind(config_cls, spec)
        missing = sorted(set(config_cls.plugin_cls.input_keys) - set(spec.host.feeds))
        if refused is None or missing:
            return [], f"the {spec.host.name} host cannot feed {missing}" if missing else "give its case `refused`"
        case_id = f"{type_name}-{spec.variant}" if spec.variant else type_name
        found.append(Case(case_id, config_cls, spec.host, spec.fields, refused))
    return found, None


def cases() -> list[Case]:
    """The matrix: every case of every type of :func:`matrix_types`, in registration order."""
    return [case for name, cls in matrix_types().items() for case in cases_of(name, cls)[0]]


def uncovered() -> dict[str, str]:
    """Types of :func:`matrix_types` without a case: type name -> why."""
    reasons = {name: cases_of(name, cls)[1] for name, cls in matrix_types().items()}
    return {name: reason for name, reason in reasons.items() if reason is not None}
