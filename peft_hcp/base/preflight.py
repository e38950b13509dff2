"""The weight file is the truth about an adapter: what a config builds is checked against it before it is built.

A downloaded adapter folder is data. Its config says which layers to wrap and how large each block is; its
safetensors header says which weights the adapter has and their shapes. Building what the config asks first and
comparing afterwards lets a small config allocate without bound (``r = 2**24``) or wrap layers the file has no
weights for. So every load first *rehearses* the attach on a **meta twin** of the model: the same module tree,
sharing nothing mutable with the model, whose parameters and buffers live on the ``meta`` device. The real
constructors run there (so there is no second copy of any kind's shape rules) and allocate nothing; then the
state dict that adapter would save is compared with the file's header, read without its data. Only a config
whose every weight is in the file, with the same shape, is attached for real.

Where it runs: :func:`check_against_file` in every peft-hcp tuner's ``inject_adapter``, for a config read by
``HcpConfig.from_pretrained`` (``PeftModel.from_pretrained``, ``PeftModel.load_adapter``), whose
``checkpoint_file`` names its weights file; ``peft_hcp.load_adapter`` rehearses a whole set at
once (any PEFT type), and the kohya/LyCORIS/HCP imports rehearse their install (:func:`rehearse`).

Errors name the file: a rehearsal that fails with a peft-hcp error (``peft_hcp.errors``) raises that type; any
other error of a config that does not build (a string where a number belongs, a size past what PyTorch can
index) becomes a :class:`~peft_hcp.errors.CheckpointError`. A rehearsal stops after a bounded number of tensor
operations (:func:`operation_budget`), so a config asking for a billion blocks is refused too.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft import get_peft_model_state_dict, inject_adapter_in_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peft_hcp.base.files import read_header
from peft_hcp.base.fit import check_state_dict
from peft_hcp.errors import PEFT_HCP_ERRORS, CheckpointError
from peft_hcp.quant.hosts import quantization_of


_PEFT_PREFIX = "base_model.model."


def check_against_file(model: nn.Module, config: Any, adapter_name: str, path: str) -> None:
    """Before ``config`` is attached to ``model`` as ``adapter_name``: check what it builds against the weights
    file ``path`` it was read beside (``HcpConfig.checkpoint_file``)."""
    header = read_header(path)
    rehearse([model], lambda twins: fit_header(twins[0], config, adapter_name, header, path), path, len(header))


# -- the meta twin and the rehearsal ------------------------------------------------------------------


def meta_twins(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """One meta twin per module of ``modules`` (a module or tensor they share is shared by their twins too).

    A twin is a new object of each module's class whose ``__dict__`` is a copy of the module's, with its own
    copies of the dicts, lists and sets there (children, parameters, buffers, hooks, ``peft_config``); its
    children are twins, its parameters and buffers empty tensors of the same shape and dtype on ``meta`` (a
    quantized weight's twin is a float one of its logical shape and compute dtype, see :mod:`peft_hcp.quant`).
    Other attributes are shared with the module, read-only by convention: attaching never writes to them.
    """
    done: dict[int, Any] = {}

    def meta(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if tensor is None:
            return None
        if id(tensor) not in done:
            empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            done[id(tensor)] = (
                nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
            )
        return done[id(tensor)]

    def twin_of(module: nn.Module) -> nn.Module:
        if id(module) not in done:
            twin = done[id(module)] = type(module).__new__(type(module))
            state = {k: type(v)(v) if type(v) in _MUTABLE else v for k, v in vars(module).items()}
            state["_parameters"] = {k: meta(v) for k, v in module._parameters.items()}
            quantized = quantization_of(module)
            if quantized is not None:  # a float weight of the logical shape: what the constructors read
                logical = torch.empty(
                    quantized.weight_shape(module), dtype=quantized.compute_dtype(module), device="meta"
                )
                state["_parameters"]["weight"] = nn.Parameter(logical, requires_grad=False)
            state["_buffers"] = {k: meta(v) for k, v in module._buffers.items()}
            state["_modules"] = {k: None if v is None else twin_of(v) for k, v in module._modules.items()}
            twin.__dict__.update(state)
        return done[id(module)]

    return [twin_of(module) for module in modules]


_MUTABLE = (dict, OrderedDict, list, set)


def operation_budget(header_size: int) -> int:
    """How many tensor operations a rehearsal may run: generous for a real model (a few dozen per weight of
    the file, plus what copying a ControlNet encoder costs), small next to what an absurd config asks for."""
    return 20_000 + 64 * header_size


class _OverBudget(Exception):
    """A rehearsal ran more tensor operations than its budget allows."""


class _Budget(TorchDispatchMode):
    """Counts the tensor operations run under it and refuses the one past ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.count = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if self.count > self.limit:
            raise _OverBudget(
                f"building it takes more than {self.limit} tensor operations on this model, far more than the "
                "weights the file holds need"
            )
        return func(*args, **(kwargs or {}))


def rehearse(modules: Sequence[nn.Module], step: Callable[[list[nn.Module]], None], source: str, size: int = 0) -> None:
    """Run ``step`` on meta twins of ``modules``, with new tensors made on ``meta``; the modules are untouched.

    ``source`` (a file) names the error when ``step`` fails with anything but a peft-hcp error (see
    :func:`blamed_on`); ``size`` (the number of weights the file holds) sets the :func:`operation_budget`.
    """
    twins = meta_twins(modules)
    with (
        torch.device("meta"),
        torch.no_grad(),
        _Budget(operation_budget(size)),
        warnings.catch_warnings(),
        blamed_on(source),
    ):
        warnings.simplefilter("ignore")  # what attaching says is said again when it is done for real
        step(twins)


@contextmanager
def blamed_on(source: str) -> Iterator[None]:
    """Make every error raised inside name ``source``: peft-hcp's own keep their type, any other becomes a
    ``CheckpointError``."""
    try:
        yield
    except PEFT_HCP_ERRORS as exc:
        if source in str(exc):
            raise
        raise type(exc)(f"{source}: {exc}") from exc
    except _OverBudget as exc:
        raise CheckpointError(f"{source}: its adapter config asks for too much: {exc}.") from exc
    except Exception as exc:  # noqa: BLE001 - a config that does not build is a bad file, whatever failed
        raise CheckpointError(
            f"{source}: its adapter config does not build on this model: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    """PyTorch appends a C++ stack to some messages: the first line says what went wrong."""
    return (str(exc).splitlines() or [""])[0]


# -- comparing with the header -----------------------------------------------------------------------


def fit_header(twin: nn.Module, config: Any, adapter_name: str, header: dict[str, torch.Tensor], path: str) -> None:
    """Attach ``config`` to ``twin`` (a meta twin) as ``adapter_name``, and refuse unless ``header`` (that of the
    safetensors file ``path``, :func:`~peft_hcp.base.files.read_header`) holds exactly the weights that adapter
    saves, each with the same shape and a compatible dtype (floating point or not)."""
    working = copy.deepcopy(config)
    if getattr(working, "checkpoint_file", None) is not None:  # a peft-hcp config: no second check on the twin
        working.checkpoint_file = None
    inject_adapter_in_model(working, twin, adapter_name)
    expected = get_peft_model_state_dict(twin, adapter_name=adapter_name, save_embedding_layers=False)
    found = {key.removeprefix(_PEFT_PREFIX): value for key, value in header.items()}
    check_state_dict(
        found, expected, path, f"what its config builds on this {type(twin).__name__} as adapter {adapter_name!r}"
    )
