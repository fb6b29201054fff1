"""CIFAR ResNets with the reference's "halves" residual block: LCNN and standard forms.

Architecture of the reference code (``kylematoba/lcnn``, ``models/resnet_spectral.py``):
a 3x3 stride-1 conv-BN unit and activation as the stem (no max-pool), four stages of
64/128/256/512 channels whose first block has stride 2 (except stage 1), every block
``act((F(x/sqrt 2) + S(x/sqrt 2)) / 2)`` with ``F = unit -> act -> unit`` and ``S`` the
identity or a 1x1 conv-BN unit, global average pooling and a Linear head.

* ``lcnn_resnet18/34``: operator-spectrally-normalised convs, gamma-BN (gamma = 10),
  one ``CenteredSoftplus(beta=5)`` per activation position, spectrally normalised head.
* ``cifar_resnet18/34``: the paper's "Standard" baseline: the same network with
  ``nn.Softplus(beta=1000)``, plain non-affine BatchNorm, plain convs and a spectrally
  normalised head. It is not timm's ``resnet18``.
* ``lcnn_resnet18_025`` / ``cifar_resnet18_025``: the same at a quarter of the width
  (16/32/64/128 channels), the CPU-sized models of the Fashion-MNIST zoo.
"""
from functools import partial
from typing import Any, Dict, Sequence, Tuple, Union

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..layers import CenteredSoftplus, GammaBatchNorm2d, HalvesResidual
from ._pretrained import fashion_mnist_zoo_cfgs, lcnn_cfgs, standard_cfgs
from ._units import (
    STANDARD_LAYERS,
    ConvNormAct,
    LayerFactory,
    StemStagesClassifier,
    conv_output_size,
    create_cifar_model,
    resolve_act_layer,
    resolve_norm_layer,
    spatial_size,
)

__all__ = ["CifarResNet"]


class CifarResNet(StemStagesClassifier):
    """Halves-block ResNet for small images; LCNN form by default.

    Args:
        layers: blocks per stage.
        channels: width of each stage (the stem has ``channels[0]``).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input image channels.
        img_size: input (H, W) or side; the convs' operator norms are computed for it.
        global_pool: timm pool type ('avg', 'max', ...; '' for none, which needs num_classes=0),
            or 'flatten': the Linear head sees every position of the final map.
        drop_rate: dropout before the classifier.
        act_layer: activation factory (or timm name), instantiated once per position.
        norm_layer: norm factory (or timm name) of every conv-BN unit.
        conv_spectral_norm: normalise every conv by its operator norm.
        head_spectral_norm: normalise the Linear head by its spectral norm.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        channels: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 100,
        in_chans: int = 3,
        img_size: Union[int, Tuple[int, int]] = 32,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        act_layer: Union[str, LayerFactory] = CenteredSoftplus,
        norm_layer: Union[str, LayerFactory] = GammaBatchNorm2d,
        conv_spectral_norm: bool = True,
        head_spectral_norm: bool = True,
    ):
        super().__init__()
        if len(layers) != len(channels) or not layers:
            raise ValueError(f"layers {tuple(layers)} and channels {tuple(channels)} must be non-empty and equally long")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = spatial_size(img_size)
        act_layer = resolve_act_layer(act_layer)
        unit = partial(ConvNormAct, norm_layer=resolve_norm_layer(norm_layer), spectral=conv_spectral_norm)

        self.stem = unit(in_chans, channels[0], 3, 1, self.img_size, act_layer=act_layer)
        size, in_chs = self.stem.output_size, channels[0]
        self.feature_info = [dict(num_chs=in_chs, reduction=1, module="stem.act")]
        stages, reduction = [], 1
        for index, (depth, out_chs) in enumerate(zip(layers, channels)):
            blocks = []
            for block_index in range(depth):
                stride = 2 if index > 0 and block_index == 0 else 1
                residual = nn.Sequential()
                residual.add_module("conv1", unit(in_chs, out_chs, 3, stride, size, act_layer=act_layer))
                residual.add_module("conv2", unit(out_chs, out_chs, 3, 1, residual.conv1.output_size))
                shortcut = None if stride == 1 and in_chs == out_chs else unit(in_chs, out_chs, 1, stride, size)
                blocks.append(HalvesResidual(residual, shortcut, act=act_layer()))
                size, in_chs, reduction = residual.conv2.output_size, out_chs, reduction * stride
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{index}"))
        self.stages = nn.Sequential(*stages)
        self._init_head(in_chs, size, num_classes, global_pool, drop_rate, head_spectral_norm)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")


def feature_size(img_size: Tuple[int, int]) -> Tuple[int, int]:
    """Spatial size of the final feature map: the first convs of stages 2-4 have stride 2."""
    for _ in range(3):
        img_size = conv_output_size(img_size, 3, 2)
    return img_size


default_cfgs = generate_default_cfgs({
    **lcnn_cfgs("lcnn_resnet18", feature_size),
    **lcnn_cfgs("lcnn_resnet34", feature_size),
    **standard_cfgs("cifar_resnet18", feature_size),
    **standard_cfgs("cifar_resnet34", feature_size),
    **fashion_mnist_zoo_cfgs("lcnn_resnet18_025", lcnn=True, feature_size=feature_size),
    **fashion_mnist_zoo_cfgs("cifar_resnet18_025", lcnn=False, feature_size=feature_size),
})

QUARTER_WIDTH = (16, 32, 64, 128)


@register_model
def lcnn_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """LCNN ResNet-18 (halves blocks, CIFAR stem)."""
    model_args = dict(layers=(2, 2, 2, 2))
    return create_cifar_model(CifarResNet, "lcnn_resnet18", pretrained, **dict(model_args, **kwargs))


@register_model
def lcnn_resnet34(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """LCNN ResNet-34 (halves blocks, CIFAR stem)."""
    model_args = dict(layers=(3, 4, 6, 3))
    return create_cifar_model(CifarResNet, "lcnn_resnet34", pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """The paper's "Standard" ResNet-18: halves blocks, softplus(beta=1000), plain BN, SN head only."""
    model_args = dict(layers=(2, 2, 2, 2), **STANDARD_LAYERS)
    return create_cifar_model(CifarResNet, "cifar_resnet18", pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """The "Standard" ResNet-34: halves blocks, softplus(beta=1000), plain BN, SN head only."""
    model_args = dict(layers=(3, 4, 6, 3), **STANDARD_LAYERS)
    return create_cifar_model(CifarResNet, "cifar_resnet34", pretrained, **dict(model_args, **kwargs))


@register_model
def lcnn_resnet18_025(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Quarter-width LCNN ResNet-18 (16-128 channels), the Fashion-MNIST zoo's model."""
    model_args = dict(layers=(2, 2, 2, 2), channels=QUARTER_WIDTH)
    return create_cifar_model(CifarResNet, "lcnn_resnet18_025", pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet18_025(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Quarter-width "Standard" ResNet-18 (16-128 channels), the Fashion-MNIST zoo's baseline."""
    model_args = dict(layers=(2, 2, 2, 2), channels=QUARTER_WIDTH, **STANDARD_LAYERS)
    return create_cifar_model(CifarResNet, "cifar_resnet18_025", pretrained, **dict(model_args, **kwargs))
