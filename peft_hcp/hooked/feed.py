"""The input feeder, as the cross-layer kinds have always exported it; it lives in :mod:`peft_hcp.base.feed`
and feeds the plugins of every kind."""

from peft_hcp.base.feed import feed


__all__ = ["feed"]
