"""The low-rank family (LoRA, LoHa, LoKr, DoRA …): the interface each variant declares, and HCP's rank rules.

Interchange and merging dispatch on the block, so a new variant is one file in ``adapters/`` and edits
nothing here. As LyCORIS lets each module own its weight names, a :class:`LowRankBlock` declares:

``kohya_weights`` / ``kohya_required``
    The tensor names a kohya/LyCORIS file carries for one layer (``lora_down.weight``, ``hada_w1_a`` …),
    each also the block's own state-dict name; a file layer whose names include every required one and
    no other (besides ``alpha``) is this variant's.
``rank_dims``
    Per name, the dimension that is the rank (``None``: none). A file layer of lower rank than the block
    is zero-padded there, which keeps its output exact.
``scale_weight``
    The weight that takes a file layer's own scale (``alpha / rank``) relative to the block's scale.

and builds itself from a file with :meth:`config_kwargs_from_kohya` + :meth:`load_kohya`, writes itself
with :meth:`kohya_tensors`, and, where its update is a plain low-rank product, gives diffusers' LoRA
factors with :meth:`lora_factors`. Merging passes the host weight (:meth:`merged_weight`), for variants
whose merged weight depends on it (DoRA).
"""

from __future__ import annotations

import inspect
from typing import ClassVar, Optional, Union

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from peft_hcp.errors import CheckpointError, UnsupportedLayerError
from peft_hcp.single.block import SinglePluginBlock


def check_rank(r: Union[int, float]) -> None:
    """``r`` is a positive int, or a float in (0, 1]: a fraction of the host's output features."""
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise ValueError(f"r must be an int or a float ratio, got {r!r}.")
    if isinstance(r, int) and r < 1:
        raise ValueError(f"r must be at least 1, got {r}.")
    if isinstance(r, float) and not 0.0 < r <= 1.0:
        raise ValueError(f"A float r is a ratio of the output features and must be in (0, 1], got {r}.")


def resolve_rank(r: Union[int, float], out_features: int) -> int:
    """The rank for a host with ``out_features`` outputs (at least 1)."""
    return r if isinstance(r, int) else max(1, round(out_features * r))


def scaling(alpha: float, rank: int, alpha_auto_scale: bool) -> float:
    """HCP's scale: ``alpha / rank`` when ``alpha_auto_scale``, else ``alpha`` itself."""
    return alpha / rank if alpha_auto_scale else alpha


def host_shape(host: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv2d host; other layouts are refused."""
    if isinstance(host, nn.Linear):
        return host.in_features, host.out_features
    if isinstance(host, nn.Conv2d):
        if host.groups != 1:
            raise UnsupportedLayerError(f"Grouped convolutions (groups={host.groups}) are not supported: {host}.")
        return host.in_channels, host.out_channels
    raise UnsupportedLayerError(f"Expected nn.Linear or nn.Conv2d, got {type(host).__name__}.")


class LowRankBlock(SinglePluginBlock):
    """Base of the low-rank variants on ``nn.Linear`` / ``nn.Conv2d`` hosts; see the module docstring."""

    wrapable_classes = (nn.Linear, nn.Conv2d)
    supports_scaling = True
    kohya_weights: ClassVar[tuple[str, ...]]
    kohya_required: ClassVar[tuple[str, ...]]
    rank_dims: ClassVar[dict[str, Optional[int]]]
    scale_weight: ClassVar[str]
    rank: int

    # -- reading a kohya/LyCORIS file ----------------------------------------------------------

    @classmethod
    def matches_kohya(cls, names: set[str]) -> bool:
        """Whether one file layer's tensor names (``alpha`` left out) are this variant's."""
        return set(cls.kohya_required) <= names <= set(cls.kohya_weights)

    @classmethod
    def kohya_rank(cls, tensors: dict[str, torch.Tensor]) -> int:
        """The rank of one file layer."""
        for name, dim in cls.rank_dims.items():
            if dim is not None and name in tensors:
                return int(tensors[name].shape[dim])
        raise CheckpointError(f"{cls.__name__}: no tensor with a rank dimension among {sorted(tensors)}.")

    @classmethod
    def kohya_scale(cls, tensors: dict[str, torch.Tensor]) -> float:
        """The scale a file layer applies: kohya's ``alpha / rank`` (``alpha`` missing: 1)."""
        rank = cls.kohya_rank(tensors)
        return float(tensors["alpha"]) / rank if "alpha" in tensors else 1.0

    @classmethod
    def config_kwargs_from_kohya(cls, layers: dict[str, dict[str, torch.Tensor]]) -> dict:
        """Config fields whose blocks can hold every one of ``layers`` (``{module name: tensors}``).

        ``r`` is the largest rank and ``alpha`` gives the first layer's scale, so a file with one rank and
        one alpha (the usual case) round-trips exactly; :meth:`load_kohya` pads and folds the others.
        """
        first = next(iter(layers.values()))
        rank = max(cls.kohya_rank(tensors) for tensors in layers.values())
        return {"r": rank, "alpha": cls.kohya_scale(first) * rank, "alpha_auto_scale": True}

    def load_kohya(self, tensors: dict[str, torch.Tensor], layer: str) -> None:
        """Copy one file layer in: zero-pad a lower rank, fold the layer's own scale into ``scale_weight``.

        Shapes are checked first, so a mismatch (named with ``layer`` and both shapes) changes nothing.
        """
        params = {name: self.get_parameter(name) for name in tensors if name != "alpha"}
        wrong = [
            f"{name} {tuple(value.shape)} (the layer needs {self._needed_shape(name, value)})"
            for name, value in tensors.items()
            if name != "alpha" and not self._fits(name, value, params[name])
        ]
        if "alpha" in tensors and tensors["alpha"].numel() != 1:
            wrong.append(f"alpha {tuple(tensors['alpha'].shape)} (a scalar is needed)")
        if wrong:
            raise CheckpointError(f"Shape mismatch in layer {layer} ({type(self).__name__}): " + "; ".join(wrong))
        fold = self.kohya_scale(tensors) / self.base_scaling
        with torch.no_grad():
            for name, param in params.items():
                value = tensors[name] * fold if name == self.scale_weight else tensors[name]
                param.zero_()
                dim = self.rank_dims.get(name)
                target = param if dim is None else param.narrow(dim, 0, value.shape[dim])
                target.copy_(value.reshape(target.shape).to(param.dtype))

    def _fits(self, name: str, value: torch.Tensor, param: torch.Tensor) -> bool:
        dim = self.rank_dims.get(name)
        if value.dim() != param.dim():
            return value.numel() == param.numel() and dim is None
        return all(v == p or (d == dim and v <= p) for d, (v, p) in enumerate(zip(value.shape, param.shape)))

    def _needed_shape(self, name: str, value: torch.Tensor) -> str:
        shape: list[Union[int, str]] = list(self.get_parameter(name).shape)
        dim = self.rank_dims.get(name)
        if dim is not None:
            shape[dim] = f"≤{shape[dim]}"
        return "(" + ", ".join(map(str, shape)) + ")"

    # -- hot-swapping ----------------------------------------------------------------------------

    def pad_dims(self, name: str) -> tuple[int, ...]:
        """The dimensions of weight ``name`` that are the rank (those zero-padding may grow)."""
        dim = self.rank_dims.get(name)
        return () if dim is None else (dim,)

    def pad_rank(self, rank: int) -> None:
        """Zero-pad every rank dimension to ``rank``, which leaves the output unchanged: the shapes then hold any
        adapter of this structure and a rank up to ``rank``, so a compiled graph survives swapping it in."""
        if rank < self.rank:
            raise ValueError(f"{type(self).__name__} has rank {self.rank}, above the target rank {rank}.")
        for name, param in list(self.named_parameters()):
            shape = list(param.shape)
            for dim in self.pad_dims(name):
                shape[dim] = rank
            if shape == list(param.shape):
                continue
            padded = nn.Parameter(param.new_zeros(shape), requires_grad=param.requires_grad)
            with torch.no_grad():
                padded[tuple(slice(0, n) for n in param.shape)] = param
            owner_name, _, attr = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            setattr(owner, attr, padded)
            _match_weight_shape(owner)
        self.rank = rank

    @staticmethod
    def scale_for(config, host: nn.Module) -> float:
        """The scale a block built from ``config`` on ``host`` computes with (HCP's rule, as :func:`scaling`)."""
        return scaling(config.alpha, resolve_rank(config.r, host_shape(host)[1]), config.alpha_auto_scale)

    # -- writing -------------------------------------------------------------------------------

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """This block's tensors under kohya/LyCORIS names, with ``alpha`` (= scale × rank)."""
        state = self.state_dict()
        tensors = {name: state[name].detach().clone() for name in self.kohya_weights if name in state}
        tensors["alpha"] = torch.tensor(float(self.base_scaling * self.rank))
        return tensors

    def lora_factors(self, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` of diffusers' LoRA layout equal to this block, scale folded into ``lora_B``."""
        raise ValueError(
            f"{type(self).__name__} has no exact form in diffusers' LoRA layout; export it as a kohya/LyCORIS file."
        )


def _match_weight_shape(module: nn.Module) -> None:
    """Update a Linear's / Conv2d's feature counts after its weight was replaced by one of another shape."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups


def lowrank_types() -> dict[type[LowRankBlock], type]:
    """Every registered low-rank variant: ``{block class: config class}``, in registration order."""
    blocks = {
        config_cls: inspect.getattr_static(config_cls, "plugin_cls", None)
        for config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.values()
    }
    return {
        block_cls: config_cls
        for config_cls, block_cls in blocks.items()
        if isinstance(block_cls, type) and issubclass(block_cls, LowRankBlock)  # a LazyClass is no low-rank block
    }


def lowrank_type_of(names: set[str], layer: str, source: str) -> type[LowRankBlock]:
    """The one registered variant whose file tensors are ``names``; an error naming ``layer`` otherwise."""
    names = names - {"alpha"}
    variants = lowrank_types()
    found = [block_cls for block_cls in variants if block_cls.matches_kohya(names)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"{source}: layer {layer} fits several variants {[c.__name__ for c in found]}.")
    known = ", ".join(f"{c.__name__}: {sorted(c.kohya_weights)}" for c in variants)
    unknown = sorted(names - {name for c in variants for name in c.kohya_weights})
    if unknown:
        raise CheckpointError(f"{source}: layer {layer} has unknown keys {unknown} (low-rank variants: {known}).")
    raise CheckpointError(
        f"{source}: layer {layer} is incomplete or mixes variants: it holds {sorted(names)} (low-rank variants: {known})."
    )
