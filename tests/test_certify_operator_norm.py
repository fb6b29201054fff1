import pytest
import torch
from torch import nn

from lcnn_timm.certify.operator_norm import conv_norm_bound, gram_norm_bound, layer_norm_bound
from lcnn_timm.layers import spectral_norm
from lcnn_timm.layers.spectral_norm import operator_for


def dense_operator_norm(op, weight):
    """Largest singular value of the conv as a dense float64 matrix (applied to every basis vector)."""
    n = op.in_channels * op.input_size[0] * op.input_size[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, op.in_channels, *op.input_size)
    columns = torch.cat([op.apply(basis[i : i + 1], weight.double()).flatten(1) for i in range(n)])
    return torch.linalg.matrix_norm(columns.T, ord=2).item()


CONVS = [  # (conv, input size)
    (nn.Conv2d(3, 4, 3, padding=1), (5, 5)),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1), (7, 6)),
    (nn.Conv2d(2, 3, 3, stride=2, padding=0), (8, 8)),
    (nn.Conv2d(2, 4, 3, padding=2, dilation=2), (6, 5)),
    (nn.Conv2d(4, 6, 3, padding=1, groups=2), (5, 4)),
    (nn.Conv2d(4, 4, 3, stride=(2, 1), padding=1, groups=4), (7, 5)),
    (nn.Conv2d(2, 3, 4, padding="same"), (5, 6)),  # asymmetric: one more row/col of padding right/bottom
    (nn.Conv2d(3, 5, 1, stride=2), (5, 5)),
    (nn.Conv2d(2, 2, 5, stride=3, padding=2), (9, 7)),
]


@pytest.mark.parametrize("conv, size", CONVS)
def test_conv_bound_is_above_and_close_to_dense_svd(conv, size):
    torch.manual_seed(0)
    op = operator_for(conv, size)
    exact = dense_operator_norm(op, conv.weight.detach())
    bound = conv_norm_bound(conv.weight, op).item()
    assert exact <= bound
    # circular embedding may exceed the zero-padded norm, but never by more than the kernel's worst case
    kernel_matrix = conv.weight.detach().double().flatten(1)
    assert bound <= torch.linalg.matrix_norm(kernel_matrix, ord=2).item() * (conv.weight[0, 0].numel() ** 0.5) * 1.000001


def test_timm_same_padding_conv():
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(1)
    conv = Conv2dSame(2, 3, 3, stride=2)
    op = operator_for(conv, (6, 7))
    assert op.padding[0] != op.padding[1] or op.padding[2] != op.padding[3]
    assert dense_operator_norm(op, conv.weight.detach()) <= conv_norm_bound(conv.weight, op).item()


def test_conv_bound_is_tight_for_circular_equivalent_geometry():
    # 1x1 conv, stride 1: the zero-padded and circular operators coincide (a per-pixel matrix)
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 3, 1)
    op = operator_for(conv, (3, 3))
    exact = dense_operator_norm(op, conv.weight.detach())
    assert conv_norm_bound(conv.weight, op).item() == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (10, 10)])
def test_gram_bound_of_matrices(shape):
    torch.manual_seed(3)
    a = torch.randn(4, *shape, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(a, ord=2)
    bound = gram_norm_bound(a)
    assert torch.all(exact <= bound) and torch.allclose(bound, exact, rtol=1e-3)
    assert torch.all(exact <= gram_norm_bound(a, iterations=1))  # loose but still an upper bound


def test_gram_bound_survives_huge_and_tiny_scales():
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    for scale in (1e-150, 1e150):
        assert gram_norm_bound(a * scale).item() == pytest.approx(3.0 * scale, rel=1e-6)


def test_layer_bound_covers_an_unconverged_power_iteration():
    torch.manual_seed(4)
    conv = spectral_norm(nn.Conv2d(3, 8, 3, padding=1), (6, 6), init_iterations=0).eval()
    bound, op = layer_norm_bound(conv)
    exact = dense_operator_norm(op, conv.weight.detach())
    assert exact > 1.01  # sigma under-estimates the norm, so W / sigma is not 1-Lipschitz
    assert exact <= bound.item() <= exact * 1.5
    linear = spectral_norm(nn.Linear(5, 4), init_iterations=0).eval()
    bound, _ = layer_norm_bound(linear)
    assert torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2).item() <= bound.item()
