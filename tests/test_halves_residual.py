import math

import pytest
import torch
from torch import nn

from lcnn_timm.layers import CenteredSoftplus, HalvesResidual


@pytest.mark.parametrize("with_shortcut", [False, True])
def test_matches_definition_and_its_gradients(with_shortcut):
    # act((F(x / sqrt 2) + S(x / sqrt 2)) / 2), against the formula written out in float64
    torch.manual_seed(0)
    residual = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), CenteredSoftplus(2.0), nn.Conv2d(3, 3, 3, padding=1))
    shortcut = nn.Conv2d(3, 3, 1) if with_shortcut else None
    block = HalvesResidual(residual, shortcut, act=CenteredSoftplus(3.0)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    half = x / math.sqrt(2.0)
    expected = block.act((block.residual(half) + block.shortcut(half)) / 2)
    actual = block(x)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(actual)
    params = [x, *block.parameters()]
    for a, e in zip(torch.autograd.grad(actual, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_double_backward_through_block():
    # gradient regularisation differentiates the input gradient again: the in-place scaling must allow it
    block = HalvesResidual(nn.Conv2d(2, 2, 3, padding=1), act=CenteredSoftplus(2.0)).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(block, (x,))
