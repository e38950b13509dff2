"""Configs of the cross-layer plugin kinds: ``from_layer``/``to_layer`` and ``from_layers``/``to_layers``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft_hcp.base.config import HcpConfig


@dataclass
class HcpPluginConfig(HcpConfig):
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
        for name in ("from_layer", "to_layer"):  # one string is one selector, as a convenience
            self._selector_list(name)


@dataclass
class HcpMultiPluginConfig(HcpConfig):
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
        for name in ("from_layers", "to_layers"):
            self._selector_list(name)
