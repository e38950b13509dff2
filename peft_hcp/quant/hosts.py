"""The host table: every kind of layer weight a plugin can sit on, float or quantized, in one dispatch table.

As PEFT's LoRA dispatches a host to its layer class by a list of ``dispatch_*`` functions, peft-hcp
dispatches a host *weight* by :data:`HOST_TYPES`: the first entry whose :meth:`HostType.matches` accepts the
layer describes it. Adding a quantizer is one :class:`HostType` subclass and one entry there. An entry knows

* the weight's **logical** shape (``(out, in[, kh, kw])``), never the packed byte shape of its storage;
* its compute dtype and :meth:`~HostType.dequantized_weight`, the float weight the layer computes with;
* a name for messages (``"bnb nf4 (double quant)"``, ``"torchao int8 weight-only"``, ``"GGUF Q4_K"``);
* for merging: :meth:`~HostType.requantize` (write a new float weight back in the host's own format) and
  :meth:`~HostType.snapshot`, which keeps the exact storage so that ``unmerge`` puts it back bit for bit.

The quantizers are imported only when an entry needs them (``import peft_hcp`` imports none of
bitsandbytes, torchao or gguf): an entry recognises a host by the class of its weight, which cannot exist
without the package, and a missing package is reported by :class:`~peft_hcp.errors.QuantizerMissingError`.

Entries (CPU, torch 2.13, bitsandbytes 0.50, torchao 0.18, diffusers 0.42):

=============================  ===================================================  ==================================
host                           recognised by                                        merge
=============================  ===================================================  ==================================
bnb ``Linear4bit``             ``Params4bit`` weight (nf4, fp4, double quant)       requantized (lossy, warned)
bnb ``Linear8bitLt``           ``Int8Params`` weight (LLM.int8, row scales)         requantized (lossy, warned)
torchao                        ``Int8Tensor`` (int8 weight-only, int8 dynamic),     requantized (lossy, warned)
                               ``Float8Tensor`` (float8 weight-only)
diffusers ``GGUFLinear``       ``GGUFParameter`` weight (Q8_0, Q4_0, Q4_K, ...)     refused (:class:`GgufHost`)
diffusers layerwise casting    a ``layerwise_casting`` hook (e.g. fp8 storage)      cast back to storage (lossy, warned)
float ``Linear`` / ``Conv2d``  a floating-point weight                              exact, in place
=============================  ===================================================  ==================================

torchao's int4 weight-only config leaves a CPU layer's weight in float (no CPU int4 kernel), and its float8
dynamic-activation config needs CUDA; neither produces a CPU host of its own.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from peft_hcp.errors import MergeNotSupportedError, QuantizerMissingError, UnsupportedLayerError


#: what the ``quant`` extra installs, for the error a missing quantizer raises
INSTALL_HINT = "pip install 'peft-hcp[quant]'"
_MISSING = object()
#: a host layer: an ``nn.Module``, typed loosely because each quantizer adds attributes torch's stubs do not know
Host = Any


def require(package: str, module: Optional[str] = None, *, needed_for: str) -> Any:
    """Import ``module`` (default: ``package``), or raise :class:`QuantizerMissingError` naming the package."""
    try:
        return importlib.import_module(module or package)
    except ImportError as error:
        raise QuantizerMissingError(
            f"{needed_for} needs the package {package!r}, which is not installed ({INSTALL_HINT})."
        ) from error


def _weight_class_is(weight: Any, module_prefix: str, *names: str) -> bool:
    cls = type(weight)
    return cls.__name__ in names and cls.__module__.startswith(module_prefix)


@dataclass
class StorageSnapshot:
    """A host weight's storage as it was, to put back exactly: the objects held in some attributes (a quantized
    weight and its scales) and the values of some tensors (a float weight written in place)."""

    attrs: list[tuple[Any, str, Any]] = field(default_factory=list)
    values: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def of_attrs(cls, *pairs: tuple[Any, str]) -> StorageSnapshot:
        return cls(attrs=[(owner, name, getattr(owner, name, _MISSING)) for owner, name in pairs])

    def restore(self) -> None:
        for owner, name, value in self.attrs:
            if value is _MISSING:
                if hasattr(owner, name):
                    delattr(owner, name)
            else:
                setattr(owner, name, value)
        with torch.no_grad():
            for tensor, value in self.values:
                tensor.copy_(value)


class HostType:
    """One entry of :data:`HOST_TYPES`: a kind of host weight. Subclasses override what differs."""

    #: the family, for messages and documentation
    family: ClassVar[str]
    #: whether :meth:`requantize` loses precision (a merge then warns)
    lossy_merge: ClassVar[bool] = True

    def matches(self, host: Host) -> bool:
        """Whether ``host``'s weight is of this kind (without importing the quantizer)."""
        raise NotImplementedError

    def name(self, host: Host) -> str:
        """The quantization of ``host`` in words, for messages."""
        return self.family

    def weight_shape(self, host: Host) -> torch.Size:
        """The logical shape of the weight: ``(out, in)`` for a linear layer, never the storage's."""
        return host.weight.shape

    def compute_dtype(self, host: Host) -> torch.dtype:
        """The dtype the host computes in, which :meth:`dequantized_weight` returns."""
        return host.weight.dtype

    def dequantized_weight(self, host: Host) -> torch.Tensor:
        """The float weight the host computes with, in :meth:`compute_dtype` (a new tensor, except for a float
        host, whose own weight it is)."""
        raise NotImplementedError

    def requantize(self, host: Host, weight: torch.Tensor) -> None:
        """Store the float ``weight`` in the host, in the host's own format (a merge)."""
        self.check_requantize(host)
        raise MergeNotSupportedError(f"Cannot merge into a {self.name(host)} host.")

    def snapshot(self, host: Host) -> StorageSnapshot:
        """The host weight's storage, which :meth:`StorageSnapshot.restore` puts back exactly after
        :meth:`requantize`. Requantizing replaces the weight object, so keeping the old one is enough."""
        return StorageSnapshot.of_attrs((host, "weight"))

    def check_requantize(self, host: Host) -> None:
        """Raise :class:`MergeNotSupportedError` (naming the quantization) if :meth:`requantize` cannot work."""


class FloatHost(HostType):
    """A float ``Linear`` / ``Conv2d`` (or any layer with a floating-point weight): its weight, as it is."""

    family = "float"
    lossy_merge = False

    def matches(self, host: Host) -> bool:
        weight = getattr(host, "weight", None)
        return (
            isinstance(weight, torch.Tensor)
            and type(weight) in (torch.Tensor, nn.Parameter)
            and (weight.is_floating_point())
        )

    def name(self, host: Host) -> str:
        return f"float ({host.weight.dtype})"

    def dequantized_weight(self, host: Host) -> torch.Tensor:
        return host.weight  # itself: a trainable float weight keeps its gradient (DoRA's base term)

    def requantize(self, host: Host, weight: torch.Tensor) -> None:
        with torch.no_grad():
            host.weight.copy_(weight)

    def snapshot(self, host: Host) -> StorageSnapshot:
        # the parameter, not its .data: layerwise casting gives the parameter new data at every forward
        return StorageSnapshot(values=[(host.weight, host.weight.detach().clone())])


class LayerwiseCastHost(FloatHost):
    """diffusers' layerwise casting (``enable_layerwise_casting`` / ``apply_layerwise_casting``): the weight is
    stored in a low-precision dtype (``float8_e4m3fn`` ...) and cast to the compute dtype around each forward.

    A merge writes ``W + ΔW`` cast to the storage dtype (one rounding step of that dtype, warned);
    ``unmerge`` puts the stored values back exactly."""

    family = "layerwise casting"
    lossy_merge = True

    @staticmethod
    def _hook(host: Host) -> Any:
        registry = getattr(host, "_diffusers_hook", None)
        return None if registry is None else registry.get_hook("layerwise_casting")

    def matches(self, host: Host) -> bool:
        return self._hook(host) is not None and super().matches(host)

    def name(self, host: Host) -> str:
        hook = self._hook(host)
        return f"{self.family} ({_short(hook.storage_dtype)} storage, {_short(hook.compute_dtype)} compute)"

    def compute_dtype(self, host: Host) -> torch.dtype:
        return self._hook(host).compute_dtype

    def dequantized_weight(self, host: Host) -> torch.Tensor:
        return host.weight.detach().to(self.compute_dtype(host))


class Bnb4bitHost(HostType):
    """bitsandbytes ``Linear4bit`` (nf4 or fp4, optionally double-quantized absmax).

    On a CPU with AVX512-BF16, bitsandbytes repacks the weight in place at the first eval ``no_grad`` forward
    (``quant_state.packing_format_for_cpu``; it then computes in bf16, with bf16 block scales), after which
    ``dequantize_4bit`` reads the packed bytes as garbage. :meth:`dequantized_weight` unpacks a copy first.
    """

    family = "bnb 4-bit"

    def matches(self, host: Host) -> bool:
        return _weight_class_is(getattr(host, "weight", None), "bitsandbytes", "Params4bit")

    def name(self, host: Host) -> str:
        weight = host.weight
        nested = weight.compress_statistics or getattr(weight.quant_state, "original_nested", False)
        return f"bnb {weight.quant_type}" + (" (double quant)" if nested else "")

    def weight_shape(self, host: Host) -> torch.Size:
        return torch.Size(host.weight.quant_state.shape)

    def compute_dtype(self, host: Host) -> torch.dtype:
        state = host.weight.quant_state
        return host.compute_dtype or getattr(state, "original_dtype", state.dtype)

    def dequantized_weight(self, host: Host) -> torch.Tensor:
        functional = require("bitsandbytes", "bitsandbytes.functional", needed_for=f"A {self.name(host)} host")
        data, state = host.weight.data, host.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked_for_cpu(functional, data, state)
        return functional.dequantize_4bit(data, state).to(self.compute_dtype(host))

    def requantize(self, host: Host, weight: torch.Tensor) -> None:
        """As PEFT's bnb LoRA merges: a new ``Params4bit`` with the old one's settings, quantized on ``.to``."""
        bnb = require("bitsandbytes", needed_for=f"Merging into a {self.name(host)} host")
        old = host.weight
        settings = {
            name: getattr(old, name) for name in ("blocksize", "compress_statistics", "quant_type", "quant_storage")
        }
        new = bnb.nn.Params4bit(weight.detach().to("cpu"), requires_grad=False, module=host, **settings)
        host.weight = new.to(old.device)

    def snapshot(self, host: Host) -> StorageSnapshot:
        return StorageSnapshot.of_attrs((host, "weight"), (host, "quant_state"))


def _unpacked_for_cpu(functional: Any, data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """The standard 4-bit layout of a weight bitsandbytes repacked for AVX512-BF16, leaving the host untouched.

    bitsandbytes' own inverse rewrites the state it is given and re-quantizes the absmax it had dequantized;
    here it works on a copy, and the block scales stay the bf16 values the repacked layer computes with.
    """
    state = copy.copy(state)
    state.original_nested = False  # keep the float absmax: no second, lossy quantization of it
    absmax = state.absmax  # (blocks per row, rows) after repacking
    data, state = functional._convert_weight_packed_for_cpu_inverse(data, state)
    state.absmax = absmax.T.reshape(-1).float()
    return data, state


class Bnb8bitHost(HostType):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8()): int8 rows with one absmax scale each (``SCB``).

    The scales move from ``weight.SCB`` to ``state.SCB`` at the first forward; both places are read. In eval mode
    the layer quantizes its input too (about 1e-2 relative), so its output is not exactly ``x @ W.T``.
    """

    family = "bnb int8"

    def matches(self, host: Host) -> bool:
        return _weight_class_is(getattr(host, "weight", None), "bitsandbytes", "Int8Params")

    def name(self, host: Host) -> str:
        return "bnb int8 (LLM.int8)"

    def compute_dtype(self, host: Host) -> torch.dtype:
        bias = getattr(host, "bias", None)
        return bias.dtype if bias is not None else torch.float32

    @staticmethod
    def _scales(host: Host) -> torch.Tensor:
        scales = host.weight.SCB if host.weight.SCB is not None else host.state.SCB
        if scales is None:
            raise ValueError(f"{type(host).__name__} has no int8 scales (SCB): is its weight quantized yet?")
        return scales

    def dequantized_weight(self, host: Host) -> torch.Tensor:
        weight = host.weight.data
        if weight.dtype != torch.int8:  # has_fp16_weights=True: kept in float, quantized per call
            return weight.detach().to(self.compute_dtype(host))
        scales = self._scales(host).to(weight.device, torch.float32)
        return (weight.float() * (scales.view(-1, 1) / 127)).to(self.compute_dtype(host))

    def requantize(self, host: Host, weight: torch.Tensor) -> None:
        """As PEFT's bnb LoRA merges: a new ``Int8Params``, quantized on ``.to`` (its scales replace the state's at
        the next forward)."""
        bnb = require("bitsandbytes", needed_for=f"Merging into a {self.name(host)} host")
        old = host.weight
        new = bnb.nn.Int8Params(weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        host.weight = new.to(old.device)

    def snapshot(self, host: Host) -> StorageSnapshot:
        weight, state = host.weight, host.state
        return StorageSnapshot.of_attrs(
            (host, "weight"), (weight, "CB"), (weight, "SCB"), (state, "CB"), (state, "SCB")
        )


class TorchaoHost(HostType):
    """A torchao tensor subclass weight (``quantize_(model, config)``): ``Int8Tensor`` (``Int8WeightOnlyConfig``,
    ``Int8DynamicActivationInt8WeightConfig``) and ``Float8Tensor`` (``Float8WeightOnlyConfig``). Other torchao
    tensors compute and dequantize, and refuse a merge."""

    family = "torchao"

    def matches(self, host: Host) -> bool:
        weight = getattr(host, "weight", None)
        return type(weight).__module__.startswith("torchao") and hasattr(weight, "dequantize")

    def name(self, host: Host) -> str:
        weight = host.weight
        kind = type(weight).__name__
        if kind == "Int8Tensor":
            return "torchao int8 " + ("weight-only" if weight.act_quant_kwargs is None else "dynamic")
        if kind == "Float8Tensor":
            return "torchao float8 " + ("weight-only" if weight.act_quant_kwargs is None else "dynamic")
        return f"torchao {kind}"

    def dequantized_weight(self, host: Host) -> torch.Tensor:
        return host.weight.detach().dequantize().to(self.compute_dtype(host))

    def check_requantize(self, host: Host) -> None:
        self._granularity(host)

    def _granularity(self, host: Host) -> Any:
        """The granularity the weight was quantized with, read off its block size (per row or per tensor)."""
        weight = host.weight
        block, shape = list(getattr(weight, "block_size", ())), list(weight.shape)
        if type(weight).__name__ in ("Int8Tensor", "Float8Tensor") and len(shape) == 2:
            granularity = require("torchao", "torchao.quantization.granularity", needed_for=self.name(host))
            if block == [1, shape[1]]:
                return granularity.PerRow()
            if block == shape:
                return granularity.PerTensor()
        raise MergeNotSupportedError(
            f"Cannot merge into a {self.name(host)} host (block size {block}, weight {tuple(shape)}): only int8 and "
            "float8 weights quantized per row or per tensor are requantized. Keep the adapter unmerged."
        )

    def requantize(self, host: Host, weight: torch.Tensor) -> None:
        """The torchao tensor ``from_hp`` of the same type, granularity and activation quantization."""
        old, granularity = host.weight, self._granularity(host)
        weight = weight.detach().to(old.dtype)
        if type(old).__name__ == "Int8Tensor":
            new = type(old).from_hp(weight, granularity, act_quant_kwargs=old.act_quant_kwargs)
        else:
            new = type(old).from_hp(
                weight,
                float8_dtype=old.qdata.dtype,
                granularity=granularity,
                mm_config=old.mm_config,
                kernel_preference=old.kernel_preference,
                act_quant_kwargs=old.act_quant_kwargs,
            )
        host.weight = nn.Parameter(new, requires_grad=False)


class GgufHost(HostType):
    """diffusers' ``GGUFLinear`` (``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))``): the
    weight holds GGML blocks as bytes, dequantized with diffusers' ``dequantize_gguf_tensor`` (what the layer
    itself computes with on CPU).

    A merge is refused. Requantizing is not possible for most types from Python (``gguf`` quantizes Q8_0, Q4_0
    ... but no K-quant), and writing a float weight instead would grow the layer four to eight times and
    silently change what the file-backed model is; a GGUF model is served with its adapters unmerged, or merged
    on the float model before conversion.
    """

    family = "GGUF"
    lossy_merge = False

    def matches(self, host: Host) -> bool:
        return _weight_class_is(getattr(host, "weight", None), "diffusers", "GGUFParameter")

    def name(self, host: Host) -> str:
        quant_type = host.weight.quant_type
        return f"GGUF {getattr(quant_type, 'name', quant_type)}"

    def weight_shape(self, host: Host) -> torch.Size:
        return torch.Size(host.weight.quant_shape)

    def compute_dtype(self, host: Host) -> torch.dtype:
        return getattr(host, "compute_dtype", None) or torch.float32

    def dequantized_weight(self, host: Host) -> torch.Tensor:
        utils = require("gguf", "diffusers.quantizers.gguf.utils", needed_for=f"A {self.name(host)} host")
        return utils.dequantize_gguf_tensor(host.weight.detach()).to(self.compute_dtype(host))

    def check_requantize(self, host: Host) -> None:
        raise MergeNotSupportedError(
            f"Cannot merge into a {self.name(host)} host: GGUF weights are not requantized, and a float weight in "
            "their place would silently change the model. Keep the adapter unmerged (as GGUF LoRAs are served), "
            "or merge into the float model before converting it to GGUF."
        )


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_FLOAT = FloatHost()
#: The host table, most specific first: :func:`host_type` takes the first entry that matches.
HOST_TYPES: tuple[HostType, ...] = (
    Bnb4bitHost(),
    Bnb8bitHost(),
    TorchaoHost(),
    GgufHost(),
    LayerwiseCastHost(),
    _FLOAT,
)


def host_type(module: Host) -> HostType:
    """The :data:`HOST_TYPES` entry of ``module``'s weight; an error naming the weight's type when none fits."""
    entry = _entry_of(module)
    if entry is None:
        weight = getattr(module, "weight", None)
        raise UnsupportedLayerError(
            f"{type(module).__name__} has a weight of type {type(weight).__name__} "
            f"({getattr(weight, 'dtype', None)}) that no host type knows: "
            f"known are {', '.join(entry.family for entry in HOST_TYPES)} (peft_hcp.quant.HOST_TYPES)."
        )
    return entry


def quantization_of(module: Host) -> Optional[HostType]:
    """The host table entry of a quantized (or low-precision stored) ``module``; ``None`` for a float one, or one
    that no entry knows (a layer without a weight)."""
    entry = _entry_of(module)
    return None if entry is _FLOAT else entry


def _entry_of(module: Host) -> Optional[HostType]:
    weight: Any = getattr(module, "weight", None)
    # the common case first, without the table: what torch.compile traces on every adapted layer
    if type(weight) in (torch.Tensor, nn.Parameter) and getattr(module, "_diffusers_hook", None) is None:
        return _FLOAT if weight.is_floating_point() else None
    return next((entry for entry in HOST_TYPES if entry.matches(module)), None)


def dequantized_weight(module: Host) -> torch.Tensor:
    """``module``'s weight as the float tensor it computes with (its own weight, detached, for a float layer)."""
    return host_type(module).dequantized_weight(module)


def weight_shape(module: Host) -> torch.Size:
    """The logical shape of ``module``'s weight (never the packed shape of a quantized storage)."""
    return host_type(module).weight_shape(module)


def warn_lossy_merge(module: Host, entry: HostType) -> None:
    """The warning a merge into a lossy host gives (PEFT warns likewise for bnb)."""
    warnings.warn(
        f"Merging into a {entry.name(module)} host requantizes its weight: the merged output differs from the "
        "unmerged one by up to one quantization step. unmerge() restores the original weight exactly.",
        stacklevel=3,
    )
