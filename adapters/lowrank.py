"""Rank and scaling rules shared by the low-rank plugins (LoRA, LoHa), with HCP's semantics."""

from __future__ import annotations

from typing import Union

from torch import nn

from peft_hcp.errors import UnsupportedLayerError


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
