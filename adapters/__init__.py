"""Concrete plugins built on peft-hcp: the worked examples to copy when writing your own.

``import peft_hcp`` registers every bundled type with PEFT (:func:`register_bundled`); ``peft_hcp`` re-exports
``__all__``, each name loaded on first use. A new variant is one module here plus its entries below. The
ControlNet types register through :mod:`.controlnet_types`; their model code loads on first attach.
"""

import importlib

from peft_hcp.lazy import lazy_names


_EXPORTS = {
    "peft_hcp.adapters.controlnet": ("ControlNetPlugin",),
    "peft_hcp.adapters.controlnet_types": (
        "HcpControlNetConfig",
        "HcpFluxControlNetConfig",
        "HcpSD3ControlNetConfig",
    ),
    "peft_hcp.adapters.loha": ("HcpLohaConfig", "LohaBlock"),
    "peft_hcp.adapters.lokr": ("HcpLokrConfig", "LokrBlock"),
    "peft_hcp.adapters.lora": ("HcpLoraConfig", "LoraBlock"),
    "peft_hcp.adapters.prelu": ("HcpPReLUConfig", "PReLUPatch"),
    "peft_hcp.adapters.skip": ("HcpSkipConfig", "SkipBlock"),
}
#: the modules whose classes register the bundled types with PEFT when they are defined
REGISTERING_MODULES = [module for module in _EXPORTS if module != "peft_hcp.adapters.controlnet"]

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)


def register_bundled() -> None:
    """Register every bundled plugin type with PEFT (again: harmless)."""
    for module in REGISTERING_MODULES:
        importlib.import_module(module)
