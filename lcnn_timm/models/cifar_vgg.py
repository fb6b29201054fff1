"""CIFAR VGG-11 (reference ``models/vgg_spectral.py``): LCNN and standard forms.

Ten 3x3 conv-BN units with an activation each, in five stages of
64 / 128 / 256-256 / 512-512 / 512-512 channels with a 2x2 pooling in front of
stages 2-5, then (by default, ``global_pool='flatten'``) no global pooling: the head
is a Linear on the flattened 512 x (H/16) x (W/16) map (2048 features at 32x32, as
in the reference).

* ``lcnn_vgg11``: operator-spectrally-normalised convs, gamma-BN (gamma = 10), one
  ``CenteredSoftplus(beta=5)`` per position, spectrally normalised head and 2x2
  *average* pooling. Two deliberate departures from the reference, which shares
  one beta over all ten positions, leaves the head un-normalised and max-pools:
  max-pooling is not twice differentiable and an un-normalised head has an
  unbounded slope, so the certified bounds (lcnn_timm.certify) would not exist.
  ``downsample='max', head_spectral_norm=False`` gives the reference's layers.
* ``cifar_vgg11``: the reference baseline: ``nn.Softplus(beta=1000)``, plain
  non-affine BatchNorm, plain convs and head, max-pooling.
"""
from functools import partial
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from ..layers import CenteredSoftplus, GammaBatchNorm2d
from ._pretrained import lcnn_cfgs, standard_cfgs
from ._units import (
    FLATTEN_POOL,
    STANDARD_LAYERS,
    CifarClassifier,
    ConvNormAct,
    LayerFactory,
    create_cifar_model,
    resolve_act_layer,
    resolve_norm_layer,
    spatial_size,
)

__all__ = ["CifarVgg"]

_POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


class CifarVgg(CifarClassifier):
    """VGG for small images; LCNN form by default.

    Args:
        stage_channels: conv widths per stage; stages after the first start with a 2x2 pooling.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input image channels.
        img_size: input (H, W) or side; the convs' operator norms are computed for it.
        global_pool: 'flatten' (default, the reference): the Linear head sees the whole final map;
            a timm pool type ('avg', 'max', ...); '' for none, which needs num_classes=0.
        drop_rate: dropout before the classifier.
        act_layer: activation factory (or timm name), instantiated once per position.
        norm_layer: norm factory (or timm name) of every conv-BN unit.
        conv_spectral_norm: normalise every conv by its operator norm.
        head_spectral_norm: normalise the Linear head by its spectral norm.
        downsample: 'avg' or 'max' 2x2 pooling between stages.
    """

    def __init__(
        self,
        stage_channels: Sequence[Sequence[int]] = ((64,), (128,), (256, 256), (512, 512), (512, 512)),
        num_classes: int = 100,
        in_chans: int = 3,
        img_size: Union[int, Tuple[int, int]] = 32,
        global_pool: str = FLATTEN_POOL,
        drop_rate: float = 0.0,
        act_layer: Union[str, LayerFactory] = CenteredSoftplus,
        norm_layer: Union[str, LayerFactory] = GammaBatchNorm2d,
        conv_spectral_norm: bool = True,
        head_spectral_norm: bool = True,
        downsample: str = "avg",
    ):
        super().__init__()
        if downsample not in _POOLS:
            raise ValueError(f"downsample must be one of {sorted(_POOLS)}, got {downsample!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = spatial_size(img_size)
        act_layer = resolve_act_layer(act_layer)
        unit = partial(
            ConvNormAct, norm_layer=resolve_norm_layer(norm_layer), act_layer=act_layer, spectral=conv_spectral_norm
        )

        size, in_chs, reduction = self.img_size, in_chans, 1
        self.feature_info = []
        stages = []
        for index, widths in enumerate(stage_channels):
            stage = nn.Sequential()
            if index > 0:
                stage.add_module("pool", _POOLS[downsample](kernel_size=2, stride=2))
                size, reduction = tuple(s // 2 for s in size), reduction * 2
                if min(size) < 1:
                    raise ValueError(f"img_size {self.img_size} is too small for {len(stage_channels)} stages")
            for unit_index, out_chs in enumerate(widths):
                stage.add_module(str(unit_index), unit(in_chs, out_chs, 3, 1, size))
                in_chs = out_chs
            stages.append(stage)
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"stages.{index}"))
        self.stages = nn.Sequential(*stages)
        self._init_head(in_chs, size, num_classes, global_pool, drop_rate, head_spectral_norm)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stages\.0\.", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    def bound_chain(self) -> List[Tuple[str, nn.Module]]:
        """Layers in forward order, for :func:`lcnn_timm.certify.certify` and :func:`lcnn_timm.curvature.curvature_proxy`."""
        return [("stages", self.stages), *self.head_bound_chain()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x, flatten=True)
        return self.stages(x)


def feature_size(img_size: Tuple[int, int]) -> Tuple[int, int]:
    """Spatial size of the final feature map: four 2x2 poolings."""
    return tuple(s // 16 for s in img_size)


default_cfgs = generate_default_cfgs({
    **lcnn_cfgs("lcnn_vgg11", feature_size, first_conv="stages.0.0.conv"),
    **standard_cfgs("cifar_vgg11", feature_size, first_conv="stages.0.0.conv"),
})


@register_model
def lcnn_vgg11(pretrained: bool = False, **kwargs: Any) -> CifarVgg:
    """LCNN VGG-11 for 32x32 inputs (average pooling, spectrally normalised head)."""
    return create_cifar_model(CifarVgg, "lcnn_vgg11", pretrained, **kwargs)


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs: Any) -> CifarVgg:
    """The reference's standard VGG-11: softplus(beta=1000), plain BN, max-pooling, plain head."""
    model_args = dict(STANDARD_LAYERS, head_spectral_norm=False, downsample="max")
    return create_cifar_model(CifarVgg, "cifar_vgg11", pretrained, **dict(model_args, **kwargs))
