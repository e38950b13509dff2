"""LoKr as a single-layer plugin on the parameter route: ``W + kron(w1, w2) * scaling``.

The structure follows PEFT's ``LoKrConfig`` and LyCORIS (``out = a*b``, ``in = c*d``, ``w1`` is ``a x c``,
``w2`` is ``b x d`` (x the kernel)): each factor is a full matrix, or a rank-``r`` product when that is
smaller (``w1`` only with ``decompose_both``; ``w2`` via a CP core ``lokr_t2`` with
``use_effective_conv2d``), or both full at any rank with LyCORIS's ``full_matrix``. Each of these can differ
per layer (``structure_pattern``). Parameters carry LyCORIS's names, so kohya/LyCORIS LoKr files import and
export, a file whose layers mix structures (LyCORIS's defaults do) as one adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch
from peft.tuners.lokr.layer import factorization
from torch import nn

from peft_hcp.errors import CheckpointError
from peft_hcp.quant.hosts import weight_shape
from peft_hcp.single import HcpSingleModel, SinglePluginLayer
from peft_hcp.single.lowrank import (
    LowRankBlock,
    LowRankConfig,
    host_shape,
    resolve_rank,
)


_W1 = ("lokr_w1", "lokr_w1_a", "lokr_w1_b")
_W2 = ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_W1_FORMS = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
_W2_FORMS = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"})


def _is_decomposed(names) -> bool:
    """Whether a LoKr layer has a low-rank factor (LyCORIS ignores ``alpha`` when it has none)."""
    return "lokr_w1_a" in names or "lokr_w2_a" in names


class LokrBlock(LowRankBlock):
    """The Kronecker product of ``w1`` and ``w2``, scaled, added to the host's weight (see the module docstring)."""

    hook_param = "weight"
    kohya_weights = _W1 + _W2
    kohya_required = ()  # which names are required depends on the structure: see matches_kohya
    # lokr_w2_a's rank is its dim 0 under a CP core: __init__ sets that block's own table
    rank_dims = {"lokr_w1_a": 1, "lokr_w1_b": 0, "lokr_w2_a": 1, "lokr_w2_b": 0, "lokr_t2": 0}
    scale_weight = "lokr_w1"

    def __init__(self, host: nn.Module, config: HcpLokrConfig) -> None:
        super().__init__(host, config)
        in_features, out_features = host_shape(host)
        self.rank = r = resolve_rank(config.r, out_features)
        kernel = tuple(weight_shape(host)[2:])  # () for Linear; the logical shape, not a quantized storage's
        out_l, out_k = factorization(out_features, config.decompose_factor)
        in_m, in_n = factorization(in_features, config.decompose_factor)
        use_w1 = config.full_matrix or not (config.decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = config.full_matrix or r >= max(out_k, in_n) / 2
        tucker = config.use_effective_conv2d and not use_w2 and any(k != 1 for k in kernel)

        shapes = {"lokr_w1": (out_l, in_m)} if use_w1 else {"lokr_w1_a": (out_l, r), "lokr_w1_b": (r, in_m)}
        if use_w2:
            shapes["lokr_w2"] = (out_k, in_n, *kernel)
        elif tucker:
            shapes.update(lokr_t2=(r, r, *kernel), lokr_w2_a=(r, out_k), lokr_w2_b=(r, in_n))
            self.rank_dims = {**self.rank_dims, "lokr_w2_a": 0}
        else:
            shapes.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n * math.prod(kernel)))
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            nn.init.kaiming_uniform_(self.get_parameter(name), a=math.sqrt(5))
        # PEFT's init: True zeroes w1 (or w1_a), "lycoris" zeroes w2 (or w2_b); either way the product is 0
        if config.init_weights == "lycoris":
            nn.init.zeros_(self.get_parameter("lokr_w2" if use_w2 else "lokr_w2_b"))
        elif config.init_weights:
            nn.init.zeros_(self.get_parameter("lokr_w1" if use_w1 else "lokr_w1_a"))
        self.scale_weight = "lokr_w1" if use_w1 else "lokr_w1_a"
        self.out_k, self.in_n, self.kernel = out_k, in_n, kernel
        self.base_scaling = self.scaling = self.scale_for(config, host)

    def forward(self, host_param: torch.Tensor) -> torch.Tensor:
        return host_param + self.get_delta_weight().to(host_param.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1 if "lokr_w1" in self._parameters else self.lokr_w1_a @ self.lokr_w1_b
        if "lokr_w2" in self._parameters:
            w2 = self.lokr_w2
        elif "lokr_t2" in self._parameters:  # CP: w2[p, q] = sum_ij t2[i, j] * w2_a[i, p] * w2_b[j, q]
            w2 = torch.einsum("ijkl,ip,jq->pqkl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.out_k, self.in_n, *self.kernel)
        return torch.kron(w1.reshape(*w1.shape, *[1] * len(self.kernel)), w2.contiguous()) * self.scaling

    @staticmethod
    def scale_for(config, host: nn.Module) -> float:
        """As LyCORIS, ``full_matrix`` layers are not scaled by ``alpha / r``."""
        return 1.0 if config.full_matrix else LowRankBlock.scale_for(config, host)

    def pad_dims(self, name: str) -> tuple[int, ...]:
        return (0, 1) if name == "lokr_t2" else super().pad_dims(name)  # the CP core is rank x rank

    # -- kohya/LyCORIS files -------------------------------------------------------------------

    @classmethod
    def matches_kohya(cls, names: set[str]) -> bool:
        return names <= set(cls.kohya_weights) and names & set(_W1) in _W1_FORMS and names & set(_W2) in _W2_FORMS

    @classmethod
    def kohya_rank(cls, tensors: dict[str, torch.Tensor]) -> int:
        """The rank of a layer's low-rank factors; 1 (LyCORIS's value) for a layer of two full factors."""
        if "lokr_t2" in tensors:
            return int(tensors["lokr_t2"].shape[0])
        for name in ("lokr_w1_a", "lokr_w2_a"):
            if name in tensors:
                return int(tensors[name].shape[1])
        return 1

    @classmethod
    def kohya_scale(cls, tensors: dict[str, torch.Tensor]) -> float:
        """LyCORIS's scale: ``alpha / rank``, but 1 for two full factors or a missing or zero ``alpha``."""
        alpha = float(tensors["alpha"]) if "alpha" in tensors else 0.0
        return alpha / cls.kohya_rank(tensors) if alpha and _is_decomposed(tensors) else 1.0

    @classmethod
    def layer_fields_from_kohya(cls, tensors: dict[str, torch.Tensor], host: nn.Module) -> dict[str, Any]:
        """The fields that rebuild one file layer's structure on ``host``.

        Two full factors are LyCORIS's ``full_matrix`` (scale 1, at any rank: the rank LyCORIS writes as its
        alpha). Otherwise: its rank and alpha, ``decompose_both`` where ``w1`` is decomposed (or too large to
        stay full with it), ``use_effective_conv2d`` where a decomposed ``w2`` on a convolution of kernel > 1
        has a CP core or not. ``decompose_factor`` is ``-1`` where the default factorization gives the file's
        ``w1`` shape, else the factor LyCORIS records implicitly: ``w1``'s larger side.
        """
        in_features, out_features = host_shape(host)
        w1_shape = _w1_shape(tensors)
        default = (factorization(out_features, -1)[0], factorization(in_features, -1)[0]) == w1_shape
        fields: dict[str, Any] = {"decompose_factor": -1 if default else max(w1_shape)}
        alpha = float(tensors["alpha"]) if "alpha" in tensors else 0.0
        if not _is_decomposed(tensors):  # its alpha, which LyCORIS writes as the layer's rank, is kept as r
            return {**fields, "full_matrix": True, "r": int(alpha) if alpha >= 1 and alpha.is_integer() else None}
        rank = cls.kohya_rank(tensors)
        conv_kernel = any(k != 1 for k in weight_shape(host)[2:])
        return {
            **fields,
            "full_matrix": False,
            "r": rank,
            "alpha": alpha or float(rank),  # LyCORIS: a missing or zero alpha is the rank
            "decompose_both": True if "lokr_w1_a" in tensors else (None if rank >= max(w1_shape) / 2 else False),
            "use_effective_conv2d": "lokr_t2" in tensors if "lokr_w2_a" in tensors and conv_kernel else None,
        }

    def load_kohya(self, tensors: dict[str, torch.Tensor], layer: str) -> None:
        """Refuse, by name, a file layer whose factors are not the ones this block was built with."""
        theirs = sorted(set(tensors) - {"alpha"})
        ours = sorted(self._parameters)
        if theirs != ours:
            raise CheckpointError(
                f"LoKr layer {layer} holds {theirs}, but its config builds {ours} there: at rank {self.rank} "
                "LyCORIS's rules build that structure (a factor is full exactly when the rank is at least half "
                "its larger side, unless full_matrix)."
            )
        super().load_kohya(tensors, layer)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().kohya_tensors()
        if not _is_decomposed(tensors):  # LyCORIS applies such a layer unscaled: fold the scale into w1
            tensors["lokr_w1"] = tensors["lokr_w1"] * self.base_scaling
            tensors["alpha"] = torch.tensor(float(self.rank))
        return tensors


def _w1_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "lokr_w1" in tensors:
        return tuple(tensors["lokr_w1"].shape)
    return tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]


@dataclass
class HcpLokrConfig(LowRankConfig):
    """LoKr on ``nn.Linear`` / ``nn.Conv2d`` layers, with PEFT's ``LoKrConfig`` fields plus ``alpha_auto_scale``
    and LyCORIS's ``full_matrix``.

    With ``alpha_auto_scale=True`` (the default) the update is scaled by ``alpha / r`` as in PEFT, also when
    neither factor is decomposed (LyCORIS uses 1 there; export folds the scale into ``lokr_w1``).
    ``rank_pattern`` / ``alpha_pattern`` set ``r`` / ``alpha`` per layer, as PEFT's, and ``structure_pattern``
    the structure fields per layer: ``{key: {"decompose_both": True, "full_matrix": False, …}}``, its keys
    matched as theirs (see :class:`LowRankConfig`). A LyCORIS file whose layers differ in rank or structure
    imports as one adapter with these patterns.
    """

    r: Union[int, float] = field(
        default=8, metadata={"help": "Rank of the decomposed factors, or a ratio of the output features."}
    )
    alpha: float = field(default=8.0, metadata={"help": "Strength; divided by the rank when alpha_auto_scale."})
    decompose_both: bool = field(default=False, metadata={"help": "Decompose w1 into a rank-r product too."})
    decompose_factor: int = field(default=-1, metadata={"help": "Size of w1's sides (-1: near the square root)."})
    use_effective_conv2d: bool = field(
        default=False, metadata={"help": "On convolutions of kernel > 1, decompose w2 with a CP core (lokr_t2)."}
    )
    full_matrix: bool = field(
        default=False,
        metadata={"help": "LyCORIS's full_matrix: w1 and w2 full at any rank, the update not scaled by alpha / r."},
    )
    structure_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer structure, {key: {field: value}} of decompose_both, decompose_factor, "
            "use_effective_conv2d and full_matrix; keys match layer names as rank_pattern's."
        },
    )
    init_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: w1 starts at zero; 'lycoris': w2 starts at zero; False: random (not a no-op)."},
    )

    layer_patterns: ClassVar[dict[str, tuple[str, ...]]] = {
        **LowRankConfig.layer_patterns,
        "structure_pattern": ("decompose_both", "decompose_factor", "use_effective_conv2d", "full_matrix"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}.")

    def check_layer_fields(self) -> None:
        super().check_layer_fields()
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise ValueError(f"decompose_factor must be an int, got {self.decompose_factor!r}.")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 or a positive int, got {self.decompose_factor}.")
        for name in ("decompose_both", "use_effective_conv2d", "full_matrix"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")


class HcpLokrLayer(SinglePluginLayer, type_name="hcp_lokr", block_cls=LokrBlock):
    """The PEFT tuner layer of ``hcp_lokr``: wraps a Linear/Conv2d host, which computes with ``W + ΔW``."""


class HcpLokrModel(HcpSingleModel, layer_cls=HcpLokrLayer, config_cls=HcpLokrConfig):
    """The PEFT tuner of ``hcp_lokr``; defining it registers the type with PEFT."""
