"""Configs of the cross-layer plugin kinds: ``from_layer``/``to_layer`` and ``from_layers``/``to_layers``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft_hcp.config import HcpConfig
from peft_hcp.selectors import parse_selectors


@dataclass
class _HookedConfig(HcpConfig):
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the plugins to train and save in full (PEFT semantics)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: start as a no-op (the plugin's identity init). False: random init, for tests."},
    )

    def _check_selectors(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = list(value)
                setattr(self, name, value)
            if isinstance(value, str):  # one selector for one layer, as a convenience
                value = [value]
                setattr(self, name, value)
            parse_selectors(value)  # a malformed selector fails at construction


@dataclass
class HcpPluginConfig(_HookedConfig):
    """Base config of a from -> to plugin (:class:`~peft_hcp.hooked.block.PluginBlock`).

    ``from_layer`` and ``to_layer`` are lists of selectors (:mod:`peft_hcp.selectors`). Each side is resolved
    to layers in model order and the i-th from-layer pairs with the i-th to-layer; one plugin block is
    made per pair. Both sides must resolve to the same number of layers.
    """

    from_layer: Optional[list[str]] = field(default=None, metadata={"help": "Selectors of the layers read."})
    to_layer: Optional[list[str]] = field(
        default=None, metadata={"help": "Selectors of the layers changed; 'prehook:' changes their input."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_selectors("from_layer", "to_layer")


@dataclass
class HcpMultiPluginConfig(_HookedConfig):
    """Base config of a many -> many plugin (:class:`~peft_hcp.hooked.block.MultiPluginBlock`).

    One plugin instance per adapter. ``from_layers`` / ``to_layers`` are lists of selectors; the plugin's
    hook index follows the list order, a regex standing for all its matches in model order. ``None`` lets
    the plugin choose its layers from the host (see its ``default_layers``).
    """

    from_layers: Optional[list[str]] = field(default=None, metadata={"help": "Selectors of the layers read."})
    to_layers: Optional[list[str]] = field(
        default=None, metadata={"help": "Selectors of the layers changed; 'prehook:' changes their input."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_selectors("from_layers", "to_layers")
