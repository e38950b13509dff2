"""Publishing and converting adapter sets: the Hub (with model cards) and the community LoRA formats.

The adapter-set core itself (``attach``, ``save_adapter``, ``load_adapter`` …) lives in
:mod:`peft_hcp.adapter_set`; it is re-exported here, where it was first documented.
"""

from peft_hcp.adapter_set import (
    PLUGIN_COMPONENTS,
    SetEntry,
    attach,
    detach,
    load_adapter,
    read_set,
    save_adapter,
)
from peft_hcp.hub.card import render_card
from peft_hcp.hub.push import push_adapter, push_folder


__all__ = [
    "PLUGIN_COMPONENTS",
    "SetEntry",
    "attach",
    "detach",
    "load_adapter",
    "push_adapter",
    "push_folder",
    "read_set",
    "render_card",
    "save_adapter",
]
