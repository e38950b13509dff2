"""peft-hcp: HCP-Diffusion's model plugins as PEFT tuner types.

Importing this package registers every bundled plugin type with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` know them. The names below are loaded on
first use (``from peft_hcp import HcpLoraConfig`` imports the LoRA plugin, not the ControlNets).

The one process where importing the package does not register is the ``peft-hcp`` command's own (its
console script, ``python -m peft_hcp.cli``): Python imports this package before ``peft_hcp.cli``, and the
command must answer ``--help`` without loading torch and PEFT. Its subcommands register when they run.
"""

import os
import sys

from peft_hcp import adapters
from peft_hcp.lazy import lazy_names


_EXPORTS = {
    "peft_hcp.adapters": tuple(adapters.__all__),
    "peft_hcp.adapter_set": ("load_adapter", "save_adapter"),
    "peft_hcp.errors": (
        "CheckpointError",
        "MergeNotSupportedError",
        "PeftHcpError",
        "QuantizerMissingError",
        "SelectorMatchError",
        "SelectorSyntaxError",
        "UnsupportedLayerError",
    ),
    "peft_hcp.hooked": (
        "HcpMultiPluginConfig",
        "HcpPluginConfig",
        "MultiPluginBlock",
        "PluginBlock",
        "feed",
        "register_multi_plugin",
        "register_plugin",
    ),
    "peft_hcp.hotswap": ("hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap"),
    "peft_hcp.hub": ("push_adapter",),
    "peft_hcp.patch": (
        "HcpPatchConfig",
        "PatchPluginBlock",
        "PatchPluginContainer",
        "ReplacePatchContainer",
        "register_patch_plugin",
    ),
    "peft_hcp.selectors": ("Selector", "Target", "parse_selector", "parse_selectors", "resolve"),
    "peft_hcp.single": ("HcpSingleConfig", "SinglePluginBlock", "register_single_plugin"),
    "peft_hcp.single.lowrank": ("LowRankBlock",),
    "peft_hcp.wrap": ("wrap_model",),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
_getattr, __dir__ = lazy_names(__name__, _EXPORTS)


def __getattr__(name: str) -> object:
    if name == "__version__":
        from importlib.metadata import version

        return version("peft-hcp")
    return _getattr(name)


def _is_command_process() -> bool:
    """Whether this interpreter runs the ``peft-hcp`` command: its console script or ``python -m peft_hcp.cli``."""
    argv0 = (getattr(sys, "argv", None) or [""])[0]  # an embedded interpreter may have no argv
    if argv0 == "-m":  # runpy imports the parent packages of the module to run before it sets argv[0]
        argv = sys.orig_argv
        return "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["peft_hcp.cli"]
    return os.path.splitext(os.path.basename(argv0))[0] in ("peft-hcp", "peft-hcp-script")


if not _is_command_process():
    adapters.register_bundled()
