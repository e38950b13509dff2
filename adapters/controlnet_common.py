"""What the ControlNet plugins share: the base block and clean copies of host modules.

:class:`ControlNetBase` is the many -> many block every ControlNet plugin derives from. It owns what is the
same for a UNet, SD3 and Flux: the condition taken through ``peft_hcp.feed(model, cond=...)`` (a batch that
divides the model's batch is repeated, as for classifier-free guidance), the record of the host call's
arguments, zero (or, for tests, small random) initialisation of the outputs, and the bridge to the
matching diffusers ControlNet class: a block knows that class's config for its host and the name of each
of its weights there, so exporting and importing are state-dict renames (:mod:`.controlnet_bridge`).
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Optional

import torch
from diffusers import ModelMixin
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp.base.fit import check_state_dict
from peft_hcp.base.snapshot import HOOK_TABLES
from peft_hcp.errors import CheckpointError
from peft_hcp.hooked import MultiPluginBlock
from peft_hcp.quant import dequantized_weight, quantization_of
from peft_hcp.selectors import Target


def float_layer(layer: nn.Module) -> nn.Module:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` holding the dequantized weights of the quantized ``layer``, in its
    compute dtype: what the layer computes, as a layer that trains."""
    weight = dequantized_weight(layer).detach()
    options = dict(bias=layer.bias is not None, device="meta", dtype=weight.dtype)
    if isinstance(layer, nn.Conv2d):
        geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        twin: nn.Module = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            padding_mode=layer.padding_mode,
            **geometry,
            **options,
        )
    else:
        twin = nn.Linear(layer.in_features, layer.out_features, **options)
    twin.weight = nn.Parameter(weight.clone())
    if layer.bias is not None:
        twin.bias = nn.Parameter(layer.bias.detach().to(weight.dtype).clone())
    return twin


def clean_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its forward hooks, with PEFT tuner layers unwrapped to their base and
    quantized layers (:mod:`peft_hcp.quant`) as float layers of their dequantized weights (:func:`float_layer`):
    quantized storage neither trains nor deep-copies (a ``GGUFParameter`` cannot)."""
    saved = [(m, {attr: m.__dict__[attr] for attr in HOOK_TABLES}) for m in module.modules()]
    for m, _ in saved:
        for attr in HOOK_TABLES:
            m.__dict__[attr] = OrderedDict()
    # deepcopy takes what its memo holds for an object instead of copying it
    floats: dict[int, Any] = {
        id(m): float_layer(m)
        for m in module.modules()
        if not isinstance(m, BaseTunerLayer) and quantization_of(m) is not None
    }
    try:
        clone = copy.deepcopy(module, floats)
    finally:
        for m, hooks in saved:
            m.__dict__.update(hooks)
    if isinstance(clone, BaseTunerLayer):
        return clone.get_base_layer()
    done: list[str] = []
    for name, sub in list(clone.named_modules()):
        if name and isinstance(sub, BaseTunerLayer) and not any(name.startswith(d + ".") for d in done):
            parent, _, attr = name.rpartition(".")
            setattr(clone.get_submodule(parent), attr, sub.get_base_layer())
            done.append(name)
    return clone


def _comparable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


class ControlNetBase(MultiPluginBlock):
    """A ControlNet as a many -> many plugin; subclasses copy a host architecture and say how it maps to diffusers.

    Subclasses set ``diffusers_class`` and ``plugin_fields`` (their config fields, named as in that class's
    config) and implement :meth:`check_host` and :meth:`diffusers_config`; :meth:`diffusers_key` renames
    a weight where the plugin's module names differ from the diffusers class's.
    """

    input_keys = ("cond",)
    call_keys: ClassVar[tuple[str, ...]] = ()
    diffusers_class: ClassVar[type[ModelMixin]]
    plugin_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def diffusers_config(cls, host_config: dict, config: Any) -> dict:
        """The ``diffusers_class`` config of this plugin on a host with ``host_config``."""
        raise NotImplementedError

    @classmethod
    def config_values(cls, controlnet_config: dict) -> dict:
        """The plugin config fields of a diffusers ControlNet with ``controlnet_config``."""
        return {name: _comparable(controlnet_config[name]) for name in cls.plugin_fields}

    @classmethod
    def check_fits(cls, host: nn.Module, config: Any, controlnet: ModelMixin) -> None:
        """Refuse a diffusers ControlNet whose config differs from the one this plugin has on ``host``."""
        cls.check_host(host, config)
        _check_config(controlnet, cls.diffusers_config(dict(host.config), config), f"a {type(host).__name__} like this")

    def __init__(self, from_layers: list[Target], to_layers: list[Target], host: nn.Module, config: Any) -> None:
        super().__init__(from_layers, to_layers, host, config)
        self._arg_names = list(inspect.signature(host.forward).parameters)
        self._diffusers_config = self.diffusers_config(dict(host.config), config)

    @staticmethod
    def init_zero(modules: Iterable[nn.Module], init_weights: bool) -> None:
        """Zero the parameters of ``modules`` (the no-op start); small random values with ``init_weights=False``."""
        for module in modules:
            for param in module.parameters():
                nn.init.zeros_(param) if init_weights else nn.init.normal_(param, std=0.02)

    # -- running -------------------------------------------------------------------------------

    def remember_call(self, args: tuple, kwargs: dict) -> None:
        """Keep the host call's ``call_keys`` arguments, given by position or keyword."""
        call = dict(zip(self._arg_names, args), **kwargs)
        self.cache["call"] = {key: call.get(key) for key in self.call_keys}

    def recorded_call(self) -> dict:
        if "call" not in self.cache:
            raise RuntimeError(
                f"{type(self).__name__}: from-layer {self.from_names[0]!r} (the host call) did not run before "
                f"{self.from_names[1]!r}."
            )
        return self.cache["call"]

    def condition(self, batch: int, check: Callable[[torch.Tensor], Optional[str]]) -> torch.Tensor:
        """The fed ``cond`` repeated to ``batch``; ``check`` returns what is wrong with its shape, or ``None``."""
        cond = self.require_input("cond")
        problem = check(cond)
        if problem:
            raise ValueError(f"{type(self).__name__}: the fed 'cond' {problem}.")
        if cond.shape[0] != batch:
            if batch % cond.shape[0]:
                raise ValueError(
                    f"The fed 'cond' has batch {cond.shape[0]}, which does not divide the model's batch {batch}."
                )
            cond = cond.repeat(batch // cond.shape[0], *([1] * (cond.ndim - 1)))
        return cond

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- diffusers bridge ----------------------------------------------------------------------

    def diffusers_key(self, key: str) -> str:
        """The name of the plugin weight ``key`` in ``diffusers_class``."""
        return key

    def to_diffusers(self) -> ModelMixin:
        """A ``diffusers_class`` model holding this plugin's weights."""
        model = self.diffusers_class(**self._diffusers_config)
        state = {self.diffusers_key(k): v for k, v in self.state_dict().items()}
        model.load_state_dict(state, strict=True)
        return (model if model.dtype == self.dtype else model.to(self.dtype)).eval()

    def load_diffusers(self, controlnet: ModelMixin) -> None:
        """Take the weights of ``controlnet``, a ``diffusers_class`` model made for this host.

        Its config and every weight's name and shape are checked before one is copied."""
        target = f"{type(self).__name__} (adapter {self.adapter_name!r})"
        _check_config(controlnet, self._diffusers_config, f"this {target}")
        own = self.state_dict()
        names = {self.diffusers_key(k): k for k in own}
        state = controlnet.state_dict()
        check_state_dict(
            state, {name: own[key] for name, key in names.items()}, f"The {type(controlnet).__name__}", target
        )
        self.load_state_dict({names[k]: v for k, v in state.items()}, strict=True)


def _check_config(controlnet: ModelMixin, expected: dict, made_for: str) -> None:
    """Refuse ``controlnet`` unless its config has the ``expected`` entries, naming those that differ."""
    config = dict(controlnet.config)
    differ = [
        f"{key}: ControlNet {_comparable(config.get(key))!r}, plugin on this host {_comparable(value)!r}"
        for key, value in expected.items()
        if _comparable(config.get(key)) != _comparable(value)
    ]
    if differ:
        raise CheckpointError(f"This {type(controlnet).__name__} was not made for {made_for}; " + "; ".join(differ))
