"""Concrete plugins built on peft-hcp: the worked examples to copy when writing your own.

Importing this package registers every bundled type with PEFT; ``peft_hcp`` re-exports ``__all__``. A new
variant is one module here plus its line below.
"""

from peft_hcp.adapters.controlnet import ControlNetPlugin, HcpControlNetConfig
from peft_hcp.adapters.controlnet_dit import (
    HcpFluxControlNetConfig,
    HcpSD3ControlNetConfig,
)
from peft_hcp.adapters.loha import HcpLohaConfig, LohaBlock
from peft_hcp.adapters.lokr import HcpLokrConfig, LokrBlock
from peft_hcp.adapters.lora import HcpLoraConfig, LoraBlock
from peft_hcp.adapters.prelu import HcpPReLUConfig, PReLUPatch
from peft_hcp.adapters.skip import HcpSkipConfig, SkipBlock


__all__ = [
    "ControlNetPlugin",
    "HcpControlNetConfig",
    "HcpFluxControlNetConfig",
    "HcpLohaConfig",
    "HcpLokrConfig",
    "HcpLoraConfig",
    "HcpPReLUConfig",
    "HcpSD3ControlNetConfig",
    "HcpSkipConfig",
    "LohaBlock",
    "LokrBlock",
    "LoraBlock",
    "PReLUPatch",
    "SkipBlock",
]
