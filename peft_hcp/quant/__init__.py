"""Quantized hosts: plugins on bitsandbytes, torchao, GGUF and layerwise-cast (fp8) layers.

:mod:`~peft_hcp.quant.hosts` holds the dispatch table of host weights (:data:`HOST_TYPES`) that the plugins
read shapes, dequantized weights and merge behaviour from; :mod:`~peft_hcp.quant.build` builds quantized
models from float ones (:func:`quantize_model`). Neither imports a quantizer until a host or scheme needs it.
"""

from peft_hcp.quant.build import SCHEMES, quantize_model
from peft_hcp.quant.hosts import (
    HOST_TYPES,
    HostType,
    StorageSnapshot,
    dequantized_weight,
    host_type,
    quantization_of,
    weight_shape,
)


__all__ = [
    "HOST_TYPES",
    "SCHEMES",
    "HostType",
    "StorageSnapshot",
    "dequantized_weight",
    "host_type",
    "quantization_of",
    "quantize_model",
    "weight_shape",
]
