"""Publishing and loading adapter sets: pipeline-level save/load, the Hub, LoRA interchange formats."""

from peft_hcp.hub.adapter_set import PLUGIN_COMPONENTS, SetEntry, attach, load_adapter, read_set, save_adapter
from peft_hcp.hub.card import render_card
from peft_hcp.hub.push import push_adapter, push_folder

__all__ = [
    "PLUGIN_COMPONENTS",
    "SetEntry",
    "attach",
    "load_adapter",
    "push_adapter",
    "push_folder",
    "read_set",
    "render_card",
    "save_adapter",
]
