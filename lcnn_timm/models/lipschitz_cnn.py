"""A 1-Lipschitz LCNN built to be certified: spectrally normalised convs and Softplus MaxMin.

Every layer is 1-Lipschitz by construction (convs and linears normalised by the norm of
their true operator, :class:`~lcnn_timm.layers.SoftplusMaxMin` activations), so a logit
difference ``z_i - z_j`` is at most ``||w_i - w_j||``-Lipschitz, and each activation adds
at most ``beta / 2`` to its Hessian bound: :func:`lcnn_timm.certify.certify` gives small
bounds without any capping, and the second-order radius can beat the first-order one.

Why not the zoo's ResNet: its gamma-BN Lipschitz constants multiply to 1e11 over 18
layers, and capping them at 1 leaves a network that cannot fit (docs/certificates.md).
Why MaxMin, not an elementwise softplus: with slope ``s' < 1`` every layer shrinks the
signal that a 1-Lipschitz network cannot amplify back; MaxMin preserves gradient norm.

Layout (defaults, 1x28x28): a 3x3 stem conv, two 4x4 stride-2 convs (28 -> 14 -> 7), a
"dense" conv whose kernel covers the whole 7x7 map (a Linear on the flattened map,
kept as a conv so ``features_only`` sees conv maps), each followed by Softplus MaxMin,
then the spectrally normalised Linear head on the flattened 1x1 map.
"""
from typing import Any, Dict, Sequence, Tuple, Union

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..layers import SoftplusMaxMin, spectral_norm
from ._pretrained import fashion_mnist_cfg, weight_location
from ._units import FLATTEN_POOL, StemStagesClassifier, create_cifar_model, spatial_size

__all__ = ["LipschitzCnn"]


class SpectralConvAct(nn.Sequential):
    """Conv (with bias) normalised by its operator norm at ``input_size``, then Softplus MaxMin."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: Union[int, Tuple[int, int]], stride: int,
                 padding: int, input_size: Tuple[int, int], beta: float):
        conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding)
        self.output_size = tuple((s + 2 * padding - k) // stride + 1 for s, k in zip(input_size, conv.kernel_size))
        if min(self.output_size) < 1:
            raise ValueError(f"input size {tuple(input_size)} is too small for a {conv.kernel_size} conv with stride "
                             f"{stride}: use a larger img_size or fewer stage_channels")
        spectral_norm(conv, input_size, init_iterations=0)  # the model refreshes every norm once built
        super().__init__()
        self.conv = conv
        self.act = SoftplusMaxMin(beta)


class LipschitzCnn(StemStagesClassifier):
    """1-Lipschitz CNN with Softplus MaxMin activations; every logit difference has certified small bounds.

    Args:
        stem_chs: channels of the 3x3 stem conv.
        stage_channels: channels of each 4x4 stride-2 conv after the stem.
        dense_chs: outputs of the dense conv covering the final map (the hidden layer before the head).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input image channels.
        img_size: input (H, W) or side; the operator norms (and the dense conv's kernel) are for it.
        beta: initial sharpness of every Softplus MaxMin (learnable; ``beta / 2`` bounds each one's Hessian).
        drop_rate: dropout before the classifier.
        global_pool: only ``'flatten'`` (the dense conv leaves a 1x1 map), or ``''`` with ``num_classes=0``.
    """

    def __init__(
        self,
        stem_chs: int = 32,
        stage_channels: Sequence[int] = (64, 64),
        dense_chs: int = 128,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: Union[int, Tuple[int, int]] = 28,
        beta: float = 2.0,
        drop_rate: float = 0.0,
        global_pool: str = FLATTEN_POOL,
    ):
        super().__init__()
        for name, value in dict(stem_chs=stem_chs, dense_chs=dense_chs, **{
                f"stage_channels[{i}]": c for i, c in enumerate(stage_channels)}).items():
            if value <= 0 or value % 2:
                raise ValueError(f"{name} must be a positive even number (Softplus MaxMin pairs channels), got {value}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = spatial_size(img_size)
        self.stem = SpectralConvAct(in_chans, stem_chs, 3, 1, 1, self.img_size, beta)
        size, in_chs, reduction = self.stem.output_size, stem_chs, 1
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="stem.act")]
        stages = []
        for out_chs in stage_channels:
            stage = SpectralConvAct(in_chs, out_chs, 4, 2, 1, size, beta)
            size, in_chs, reduction = stage.output_size, out_chs, reduction * 2
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{len(stages)}"))
            stages.append(stage)
        stages.append(SpectralConvAct(in_chs, dense_chs, size, 1, 0, size, beta))  # covers the whole map
        self.feature_info.append(
            dict(num_chs=dense_chs, reduction=reduction * max(size), module=f"stages.{len(stages) - 1}"))
        self.stages = nn.Sequential(*stages)
        self._init_head(dense_chs, (1, 1), num_classes, global_pool, drop_rate, head_spectral_norm=True)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem\.", blocks=r"^stages\.(\d+)")


default_cfgs = generate_default_cfgs({
    "lcnn_lipcnn.fmnist": fashion_mnist_cfg(lambda size: (1, 1), first_conv="stem.conv",
                                            description="1-Lipschitz LCNN, certified-margin training",
                                            **weight_location("lcnn_lipcnn.fmnist")),
})


@register_model
def lcnn_lipcnn(pretrained: bool = False, **kwargs: Any) -> LipschitzCnn:
    """1-Lipschitz LCNN for 28x28 inputs (Softplus MaxMin, 32-64-64 convs, 128-wide dense layer)."""
    if kwargs.get("features_only"):
        kwargs.setdefault("out_indices", (0, 1, 2, 3))  # stem, two stride-2 stages, dense; timm's default wants 5
    return create_cifar_model(LipschitzCnn, "lcnn_lipcnn", pretrained, **kwargs)
