"""The performance changes of the single-layer hot path keep the numbers of the plain computation."""

import pytest
import torch

from peft_hcp.adapters.loha import _hadamard, _HadamardOfLowRanks


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_loha_product_recomputing_in_backward_has_exact_gradients(groups):
    generator = torch.Generator().manual_seed(groups)
    shapes = [(6, 3), (3, 5)] * groups
    factors = [torch.randn(*s, dtype=torch.double, generator=generator, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *f: _HadamardOfLowRanks.apply(0.5, *f), factors)
    plain = torch.autograd.grad((_hadamard(tuple(factors)) * 0.5).square().sum(), factors)
    ours = torch.autograd.grad(_HadamardOfLowRanks.apply(0.5, *factors).square().sum(), factors)
    for a, b in zip(plain, ours):
        torch.testing.assert_close(a, b)


def test_loha_product_keeps_only_the_factors_for_backward():
    factors = [torch.randn(64, 2, requires_grad=True), torch.randn(2, 64, requires_grad=True)] * 2
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _HadamardOfLowRanks.apply(1.0, *factors)
    assert max(saved) == 128  # no 64x64 product kept
