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

Every variant's config derives from :class:`LowRankConfig`: PEFT's per-layer ``rank_pattern`` and
``alpha_pattern``, and any pattern of its own (LoKr's ``structure_pattern``), so a file whose layers need
several ranks, alphas or structures imports as one adapter.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union, cast

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn

from peft_hcp.errors import CheckpointError, UnsupportedLayerError
from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig


def pattern_key(name: str, names: Iterable[str]) -> str:
    """The ``rank_pattern``-style key that picks layer ``name`` among ``names`` and no other.

    PEFT matches a key against the whole layer name or the part after a dot (``get_pattern_key``), so a
    top-level ``proj_out`` would also pick ``single_transformer_blocks.0.proj_out``; there the key is
    anchored, ``^proj_out``, which PEFT and diffusers read the same way.
    """
    return f"^{name}" if any(other.endswith(f".{name}") for other in names) else name


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


@dataclass
class LowRankConfig(HcpSingleConfig):
    """Base of the low-rank variants' configs: ``r``, ``alpha`` (scaled by ``alpha / r`` when
    ``alpha_auto_scale``) and PEFT's per-layer ``rank_pattern`` and ``alpha_pattern``.

    As in PEFT, a pattern maps a key to a value for the layers the key matches: a key, read as a regular
    expression, matches a layer whose whole name, or the part after one of its dots, it matches
    (``peft.utils.other.get_pattern_key``; the first key that matches wins). ``{"to_q": 8}`` gives every
    ``….to_q`` rank 8; ``{"^down_blocks.0.*": 8}`` the layers under ``down_blocks.0``. Other layers take
    ``r`` / ``alpha``.
    """

    r: Union[int, float] = field(default=4, metadata={"help": "Rank, or a float ratio of the output features."})
    alpha: float = field(default=1.0, metadata={"help": "Strength; divided by the rank when alpha_auto_scale."})
    alpha_auto_scale: bool = field(default=True, metadata={"help": "Scale by alpha / rank instead of alpha."})
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-layer ranks, {key: r}; keys match layer names as PEFT's LoraConfig.rank_pattern."},
    )
    alpha_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-layer alphas, {key: alpha}; keys match layer names as PEFT's alpha_pattern."},
    )

    #: each pattern field and the fields its values set: a one-field pattern maps keys to values (PEFT's
    #: form), a pattern of several fields maps keys to dicts of some of them
    layer_patterns: ClassVar[dict[str, tuple[str, ...]]] = {"rank_pattern": ("r",), "alpha_pattern": ("alpha",)}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_layer_fields()
        for pattern_name, targets in self.layer_patterns.items():
            patterns = getattr(self, pattern_name)
            if patterns is None:  # PEFT's configs accept None for an empty pattern
                patterns = {}
                setattr(self, pattern_name, patterns)
            if not isinstance(patterns, dict):
                raise ValueError(f"{pattern_name} must be a dict {{key: value}}, got {patterns!r:.80}.")
            for key, value in patterns.items():
                try:
                    re.compile(key)
                    changes = self._pattern_changes(targets, value)
                    self._with(changes).check_layer_fields()
                except (TypeError, ValueError, re.error) as exc:
                    raise ValueError(f"{pattern_name}[{key!r}]: {exc}") from exc

    def check_layer_fields(self) -> None:
        """Refuse a bad value of a field the patterns can set (checked for the config and for every pattern)."""
        check_rank(self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha must be a number, got {self.alpha!r}.")

    def for_layer(self, name: str) -> LowRankConfig:
        changes: dict[str, Any] = {}
        for pattern_name, targets in self.layer_patterns.items():
            patterns = getattr(self, pattern_name)
            key = get_pattern_key(patterns.keys(), name)
            if key in patterns:
                changes.update(self._pattern_changes(targets, patterns[key]))
        return self._with(changes) if changes else self

    def set_rank(self, rank: int, scales: dict[str, float]) -> None:
        """Give every layer rank ``rank`` and the alpha that keeps its scale (``scales``: ``{layer name: scale}``,
        the blocks' own), as alphas per layer name where they differ (a compiled hot-swap's padded blocks)."""
        per_layer = {
            name: {"alpha": scale * rank if self.alpha_auto_scale else scale} for name, scale in scales.items()
        }
        fields = self.fields_with_patterns(per_layer)
        self.r, self.rank_pattern = rank, {}
        self.alpha, self.alpha_pattern = fields["alpha"], fields.get("alpha_pattern", {})

    @staticmethod
    def _pattern_changes(targets: tuple[str, ...], value: Any) -> dict[str, Any]:
        if len(targets) == 1:
            return {targets[0]: value}
        if not isinstance(value, dict) or not set(value) <= set(targets):
            raise ValueError(f"a dict of some of {list(targets)} is needed, not {value!r:.80}")
        return value

    def _with(self, changes: dict[str, Any]) -> LowRankConfig:
        layer_config = copy.copy(self)
        vars(layer_config).update(changes)
        return layer_config

    @classmethod
    def fields_with_patterns(cls, per_layer: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Config fields that give each layer ``{name: {field: value}}`` its values (``None``: any value does).

        Each field takes its most frequent value; the layers that need another get a pattern entry keyed by
        :func:`pattern_key`, their own name as diffusers writes ``rank_pattern`` for a file.
        """
        kwargs: dict[str, Any] = {}
        for field_name in dict.fromkeys(f for values in per_layer.values() for f in values):
            pinned = [values[field_name] for values in per_layer.values() if values.get(field_name) is not None]
            if pinned:
                kwargs[field_name] = Counter(pinned).most_common(1)[0][0]
        for pattern_name, targets in cls.layer_patterns.items():
            patterns = {}
            for name in sorted(per_layer):
                own = {
                    f: value
                    for f in targets
                    if (value := per_layer[name].get(f)) is not None and value != kwargs.get(f, value)
                }
                if own:
                    patterns[pattern_key(name, per_layer)] = own[targets[0]] if len(targets) == 1 else own
            if patterns:
                kwargs[pattern_name] = patterns
        return kwargs


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
    def layer_fields_from_kohya(cls, tensors: dict[str, torch.Tensor], host: nn.Module) -> dict[str, Any]:
        """The config fields one file layer needs on ``host`` (a value ``None``: any value builds it)."""
        rank = cls.kohya_rank(tensors)  # kohya's alpha is HCP's alpha with alpha_auto_scale
        return {"r": rank, "alpha": float(tensors["alpha"]) if "alpha" in tensors else float(rank)}

    @classmethod
    def config_kwargs_from_kohya(
        cls, layers: dict[str, dict[str, torch.Tensor]], hosts: dict[str, nn.Module]
    ) -> dict[str, Any]:
        """Config fields whose blocks hold each of ``layers`` (``{module name: tensors}``) on its host exactly.

        ``r`` and ``alpha`` are the most frequent ones; a layer with others gets its own ``rank_pattern`` /
        ``alpha_pattern`` entry (:meth:`LowRankConfig.fields_with_patterns`), so a file with one rank and one
        alpha (the usual case) gives a config without patterns, and any file one adapter.
        """
        per_layer = {name: cls.layer_fields_from_kohya(tensors, hosts[name]) for name, tensors in layers.items()}
        return {**lowrank_types()[cls].fields_with_patterns(per_layer), "alpha_auto_scale": True}

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


def lowrank_types() -> dict[type[LowRankBlock], type[LowRankConfig]]:
    """Every registered low-rank variant: ``{block class: config class}``, in registration order."""
    blocks = {
        config_cls: inspect.getattr_static(config_cls, "plugin_cls", None)
        for config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.values()
    }
    return {
        block_cls: cast(type[LowRankConfig], config_cls)
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
