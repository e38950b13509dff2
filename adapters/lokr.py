"""LoKr as a single-layer plugin on the parameter route: ``W + kron(w1, w2) * scaling``.

The structure follows PEFT's ``LoKrConfig`` and LyCORIS (``out = a*b``, ``in = c*d``, ``w1`` is ``a x c``,
``w2`` is ``b x d`` (x the kernel)): each factor is a full matrix, or a rank-``r`` product when that is
smaller (``w1`` only with ``decompose_both``; ``w2`` via a CP core ``lokr_t2`` with
``use_effective_conv2d``). Parameters carry LyCORIS's names, so kohya/LyCORIS LoKr files import and export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
from peft.tuners.lokr.layer import factorization
from torch import nn

from peft_hcp.errors import CheckpointError
from peft_hcp.quant.hosts import weight_shape
from peft_hcp.single import HcpSingleConfig, HcpSingleModel, SinglePluginLayer
from peft_hcp.single.lowrank import (
    LowRankBlock,
    check_rank,
    host_shape,
    resolve_rank,
    scaling,
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
        use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = r >= max(out_k, in_n) / 2
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
        self.base_scaling = self.scaling = scaling(config.alpha, r, config.alpha_auto_scale)

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
    def config_kwargs_from_kohya(cls, layers: dict[str, dict[str, torch.Tensor]]) -> dict:
        """Fields that rebuild each layer's structure: decomposed layers give ``r`` (their largest rank) and
        ``alpha``; a file of full factors only gets an ``r`` at which every ``w2`` stays full, and scale 1.

        ``decompose_factor`` is ``-1`` when every ``w1`` has the shape the default factorization gives,
        else the factor LyCORIS records implicitly: the larger side of ``w1``.
        """
        decomposed = [t for t in layers.values() if _is_decomposed(t)]
        if decomposed:
            rank = max(cls.kohya_rank(t) for t in decomposed)
            alpha = cls.kohya_scale(decomposed[0]) * rank
        else:
            rank = max(max(t["lokr_w2"].shape[:2]) for t in layers.values())
            alpha = float(rank)
        w1_shapes = [_w1_shape(t) for t in layers.values()]
        default = all(s[0] == factorization(s[0] * _w2_rows(t), -1)[0] for s, t in zip(w1_shapes, layers.values()))
        return {
            "r": rank,
            "alpha": alpha,
            "alpha_auto_scale": True,
            "decompose_both": any("lokr_w1_a" in t for t in layers.values()),
            "use_effective_conv2d": any("lokr_t2" in t for t in layers.values()),
            "decompose_factor": -1 if default else max(w1_shapes[0]),
        }

    def load_kohya(self, tensors: dict[str, torch.Tensor], layer: str) -> None:
        """Refuse, by name, a file layer whose factors are not the ones this block was built with."""
        theirs = sorted(set(tensors) - {"alpha"})
        ours = sorted(self._parameters)
        if theirs != ours:
            raise CheckpointError(
                f"LoKr layer {layer} holds {theirs}, but its config builds {ours} there (another rank, "
                "decompose_both, decompose_factor or use_effective_conv2d per layer is not supported in one file)."
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


def _w2_rows(tensors: dict[str, torch.Tensor]) -> int:
    """``b``, the output side of ``w2``."""
    if "lokr_w2" in tensors:
        return tensors["lokr_w2"].shape[0]
    return tensors["lokr_w2_a"].shape[1 if "lokr_t2" in tensors else 0]


@dataclass
class HcpLokrConfig(HcpSingleConfig):
    """LoKr on ``nn.Linear`` / ``nn.Conv2d`` layers, with PEFT's ``LoKrConfig`` fields plus ``alpha_auto_scale``.

    With ``alpha_auto_scale=True`` (the default) the update is scaled by ``alpha / r`` as in PEFT, also when
    neither factor is decomposed (LyCORIS uses 1 there; export folds the scale into ``lokr_w1``).
    """

    r: Union[int, float] = field(
        default=8, metadata={"help": "Rank of the decomposed factors, or a ratio of the output features."}
    )
    alpha: float = field(default=8.0, metadata={"help": "Strength; divided by the rank when alpha_auto_scale."})
    alpha_auto_scale: bool = field(default=True, metadata={"help": "Scale by alpha / rank instead of alpha."})
    decompose_both: bool = field(default=False, metadata={"help": "Decompose w1 into a rank-r product too."})
    decompose_factor: int = field(default=-1, metadata={"help": "Size of w1's sides (-1: near the square root)."})
    use_effective_conv2d: bool = field(
        default=False, metadata={"help": "On convolutions of kernel > 1, decompose w2 with a CP core (lokr_t2)."}
    )
    init_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: w1 starts at zero; 'lycoris': w2 starts at zero; False: random (not a no-op)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.r)
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}.")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise ValueError(f"decompose_factor must be an int, got {self.decompose_factor!r}.")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 or a positive int, got {self.decompose_factor}.")


class HcpLokrLayer(SinglePluginLayer, type_name="hcp_lokr", block_cls=LokrBlock):
    """The PEFT tuner layer of ``hcp_lokr``: wraps a Linear/Conv2d host, which computes with ``W + ΔW``."""


class HcpLokrModel(HcpSingleModel, layer_cls=HcpLokrLayer, config_cls=HcpLokrConfig):
    """The PEFT tuner of ``hcp_lokr``; defining it registers the type with PEFT."""
