"""A LoRA's ``down(dropout(x))`` that keeps only what backward needs.

Autograd keeps two activation-sized tensors per adapted layer for ``down(dropout(x))``: the dropout's
noise (a float tensor on CPU, a bool mask on CUDA) and the dropped copy of ``x`` (for the gradient of
``down``'s weight), even when several layers read the same ``x`` (an attention's q, k and v).
:func:`dropout_down` keeps ``x`` itself instead, a storage the host or its sibling layers often keep
anyway, and the dropout mask packed to one bit per element; backward rebuilds the dropped input from
the two. It also folds the ``1 / keep`` rescaling into the rank-sized output, and draws the mask
from uniform noise.
"""

from __future__ import annotations

import functools
from typing import Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import nn


#: (stride, padding, dilation) of a convolutional ``down``; ``None`` for a linear one.
ConvGeometry = Optional[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]

_BITS_PER_BYTE = 8


def dropout_down(x: torch.Tensor, down: Union[nn.Linear, nn.Conv2d], dropout: nn.Module) -> torch.Tensor:
    """``down(dropout(x))``; while training with gradients, at 1/8 byte per element of ``x`` for backward.

    Anything else (evaluation, no dropout, no gradients, ``torch.compile``, a ``down`` with a bias,
    groups or non-zero padding) runs the modules as they are: there is nothing to save then, or the
    compiler plans the saved tensors itself.
    """
    if not _saves_less(down, dropout):
        return down(dropout(x))
    geometry = None if isinstance(down, nn.Linear) else (down.stride, down.padding, down.dilation)
    keep = 1.0 - cast(nn.Dropout, dropout).p  # _saves_less checked the type
    return DropoutProjection.apply(x, down.weight, keep, geometry)


def _saves_less(down: nn.Module, dropout: nn.Module) -> bool:
    active = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0 and torch.is_grad_enabled()
    if not active or torch.compiler.is_compiling() or down.bias is not None:
        return False
    if isinstance(down, nn.Linear):
        return True
    return down.groups == 1 and down.padding_mode == "zeros" and not isinstance(down.padding, str)


class DropoutProjection(torch.autograd.Function):
    """``project(x * mask) / keep`` with ``mask ~ Bernoulli(keep)``, saving ``x`` and the packed mask only.

    ``project`` is ``F.linear`` or, with a ``geometry``, ``F.conv2d`` (no bias, one group). ``x`` is
    kept only when the weight needs its gradient; the weight, a parameter, costs no memory.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, keep: float, geometry: ConvGeometry) -> torch.Tensor:
        mask = keep_mask(x.numel(), keep, x.device)
        packed = pack_mask(mask)
        dropped = mask[: x.numel()].view(x.shape).to(x.dtype).mul_(x)  # in the mask's buffer: one allocation less
        out = _project(dropped, weight, geometry).mul_(1.0 / keep)
        ctx.keep, ctx.geometry, ctx.shape, ctx.dtype = keep, geometry, x.shape, out.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, packed)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, packed = ctx.saved_tensors
        mask = unpack_mask(packed, ctx.shape.numel()).view(ctx.shape)
        # in the forward's compute dtype (an autocast's), as autograd would differentiate it
        dropped = None if x is None else x.to(ctx.dtype).where(mask, 0)
        grad_out = grad_out.to(ctx.dtype) * (1.0 / ctx.keep)
        grad_x, grad_weight = _project_backward(
            grad_out, dropped, weight.to(ctx.dtype), ctx.shape, ctx.geometry, ctx.needs_input_grad[:2]
        )
        return None if grad_x is None else grad_x.mul_(mask), grad_weight, None, None


def _project(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    if geometry is None:
        return F.linear(x, weight)
    stride, padding, dilation = geometry
    return F.conv2d(x, weight, None, stride, padding, dilation)


def _project_backward(
    grad_out: torch.Tensor,
    dropped: Optional[torch.Tensor],
    weight: torch.Tensor,
    shape: torch.Size,
    geometry: ConvGeometry,
    needs: tuple[bool, bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The gradients of ``_project``'s input (before masking) and weight, those that ``needs`` asks for."""
    needs_input, needs_weight = needs
    if geometry is None:
        grad_input = grad_out @ weight if needs_input else None
        if not needs_weight:
            return grad_input, None
        assert dropped is not None  # saved whenever the weight needs a gradient
        return grad_input, grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped.reshape(-1, shape[-1])
    stride, padding, dilation = geometry
    inputs = dropped if needs_weight else grad_out.new_empty(shape)  # only its shape is read then
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_out, inputs, weight, None, stride, padding, dilation, False, (0, 0), 1, (needs_input, needs_weight, False)
    )
    return grad_input, grad_weight


def keep_mask(numel: int, keep: float, device: torch.device) -> torch.Tensor:
    """A flat float32 mask of ones (probability ``keep``) and zeros, padded to whole bytes for :func:`pack_mask`.

    Uniform noise compared in place: cheaper than ``bernoulli_`` on CPU, and ready to multiply with.
    """
    padded = -(-numel // _BITS_PER_BYTE) * _BITS_PER_BYTE
    return torch.rand(padded, device=device).lt_(keep)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A flat float 0/1 mask (length a multiple of 8) as bytes: bit ``k`` of byte ``j`` is ``mask[k * n / 8 + j]``.

    Bit planes of contiguous slices, rather than 8 neighbours per byte, make both directions two
    whole-tensor operations each: here a product with the powers of two.
    """
    return (_powers_of_two(mask.device, mask.dtype) @ mask.view(_BITS_PER_BYTE, -1)).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` elements of the mask :func:`pack_mask` packed, as a flat bool tensor."""
    planes = packed & _powers_of_two(packed.device, torch.uint8).view(-1, 1)
    return planes.ne_(0).view(torch.bool).view(-1)[:numel]


@functools.lru_cache
def _powers_of_two(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (2 ** torch.arange(_BITS_PER_BYTE, device=device)).to(dtype)
