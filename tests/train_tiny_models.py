"""Tiny models for the training tests, built from lcnn_timm.layers (no registry needed)."""
import torch
from torch import nn

from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm2d, HalvesResidual, spectral_norm


def tiny_lcnn(in_chans: int = 1, num_classes: int = 3, img_size: int = 8, width: int = 4) -> nn.Module:
    """conv-gammaBN-softplus stem, one halves residual block, pool, linear; all convs/linear spectrally normalised."""
    torch.manual_seed(0)

    def conv_bn(cin, cout):
        conv = spectral_norm(nn.Conv2d(cin, cout, 3, padding=1, bias=False), input_size=(img_size, img_size))
        return nn.Sequential(conv, GammaBatchNorm2d(cout, gamma=2.0))

    block = HalvesResidual(
        nn.Sequential(conv_bn(width, width), CenteredSoftplus(3.0), conv_bn(width, width)),
        act=CenteredSoftplus(4.0),
    )
    return nn.Sequential(
        conv_bn(in_chans, width), CenteredSoftplus(5.0), block,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), spectral_norm(nn.Linear(width, num_classes)),
    )


def tiny_standard(in_chans: int = 1, num_classes: int = 3, width: int = 4) -> nn.Module:
    """Plain conv-BN-softplus(beta=1000) net: the Standard baseline's ingredients."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, affine=False),
        nn.Softplus(beta=1000.0), nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width, affine=False), nn.Softplus(beta=1000.0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )


def tiny_relu(in_chans: int = 1, num_classes: int = 3, width: int = 4) -> nn.Module:
    """A stock conv-BN-ReLU net with affine BNs: what ``convert: true`` turns into an LCNN."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )


def _register() -> None:
    """Expose the tiny models to timm.create_model (the trainer builds models by name)."""
    from timm.models import is_model, register_model

    if is_model("test_tiny_lcnn"):
        return

    @register_model
    def test_tiny_lcnn(pretrained=False, num_classes=3, in_chans=1, img_size=8, drop_rate=0.0, **kwargs):
        return tiny_lcnn(in_chans, num_classes, img_size)

    @register_model
    def test_tiny_standard(pretrained=False, num_classes=3, in_chans=1, drop_rate=0.0, **kwargs):
        return tiny_standard(in_chans, num_classes)

    @register_model
    def test_tiny_relu(pretrained=False, num_classes=3, in_chans=1, drop_rate=0.0, **kwargs):
        return tiny_relu(in_chans, num_classes)


_register()
