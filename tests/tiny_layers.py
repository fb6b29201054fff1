"""Small layers shared by several tests."""
import torch
from torch import nn


def eval_batchnorm(channels: int, affine: bool = True, seed: int = 0) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d with random running statistics (and affine parameters), far from the identity."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, affine=affine)
    bn.running_mean.copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    if affine:
        bn.weight.data.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(channels, generator=g))
    return bn.eval()
