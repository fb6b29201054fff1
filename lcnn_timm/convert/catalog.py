"""Which layer types the converter replaces, which it leaves alone, and why.

Types are matched exactly (not by ``isinstance``): a subclass may override
``forward`` in a way the conversion does not know, so it is reported instead.
"""
import inspect
from typing import Dict, Optional, Tuple

import torch.nn.functional as F
from timm.layers import activations, activations_me
from timm.layers.cond_conv2d import CondConv2d
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.linear import Linear as TimmLinear
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.models.efficientvit_mit import LiteMLA
from torch import nn
from torch.nn.utils import parametrize
from torchvision.ops.misc import FrozenBatchNorm2d

from ..layers.spectral_norm import is_spectral_normalized

__all__ = [
    "ACTIVATIONS",
    "GATES",
    "PLAIN_BATCHNORMS",
    "FUSED_BATCHNORM_ACTS",
    "PLAIN_CONVS",
    "STANDARDIZED_CONVS",
    "LINEARS",
    "FUNCTIONAL_ACTIVATIONS",
    "FUNCTIONAL_GATES",
    "is_lcnn_layer",
    "leave_reason",
]


def _timm_classes(module, gate: bool) -> Tuple[type, ...]:
    """nn.Module classes defined in a timm activations module: the gates (sigmoid/tanh-like) or the others."""
    classes = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, nn.Module) and cls.__module__ == module.__name__
    ]
    gate_names = ("Sigmoid", "HardSigmoid", "Tanh")
    return tuple(cls for cls in classes if (cls.__name__.removesuffix("Me") in gate_names) == gate)


# ReLU-family and other unbounded-curvature activations: replaced by CenteredSoftplus
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
) + _timm_classes(activations, gate=False) + _timm_classes(activations_me, gate=False)

# Activation slots whose output sign matters: (owner type, attribute). LiteMLA's ``kernel_func`` maps q and k
# of a linear attention that divides by ``q . sum(k) + eps``; a signed map drives that towards 0 (efficientvit_b0
# went NaN at the second step). They get a positive softplus instead of the centered one.
SIGN_KEEPING_SLOTS = {(LiteMLA, "kernel_func")}

# Saturating activations used as multiplicative gates (squeeze-excite, ...): left alone
GATES = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh) + _timm_classes(activations, gate=True) + _timm_classes(
    activations_me, gate=True
)

PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
# norm + drop + act in one module: the norm is followed by ``.drop`` then ``.act``
FUSED_BATCHNORM_ACTS = (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d)

# convs whose forward feeds ``self.weight`` unchanged to conv2d (Conv2dSame pads first; the operator knows)
PLAIN_CONVS = (nn.Conv2d, Conv2dSame)
# convs whose forward standardises ``self.weight`` first
STANDARDIZED_CONVS = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
LINEARS = (nn.Linear, TimmLinear)

FUNCTIONAL_ACTIVATIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.elu_,
    F.celu, F.selu, F.softplus, F.rrelu, F.prelu, F.hardtanh,
}
FUNCTIONAL_ACTIVATIONS |= {getattr(__import__("torch"), name) for name in ("relu", "relu_", "selu", "celu", "prelu", "rrelu")}
FUNCTIONAL_ACTIVATION_METHODS = {"relu", "relu_"}
FUNCTIONAL_GATES = {F.sigmoid, F.hardsigmoid, F.tanh, getattr(__import__("torch"), "sigmoid"), getattr(__import__("torch"), "tanh")}
FUNCTIONAL_GATE_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
MAX_POOL_REASON = "max pooling is not smooth; left alone (outside the certified bounds' theory)"
# max pooling called in a forward (inception_v3's Mixed_6a / Mixed_7a): reported like the module form
FUNCTIONAL_MAX_POOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                        F.adaptive_max_pool3d}
FUNCTIONAL_MAX_POOLS |= {getattr(__import__("torch"), name) for name in ("max_pool1d", "max_pool2d", "max_pool3d")}

_OUTSIDE_THEORY: Dict[type, Tuple[str, str]] = {
    nn.LayerNorm: ("norm", "LayerNorm is outside the LCNN theory (per-sample normalisation has no fixed Lipschitz bound)"),
    nn.GroupNorm: ("norm", "GroupNorm is outside the LCNN theory (per-sample normalisation has no fixed Lipschitz bound)"),
    nn.MultiheadAttention: ("attention", "attention is outside the LCNN theory"),
    LiteMLA: ("attention", "linear attention (LiteMLA) is outside the LCNN theory"),
    nn.RNNBase: ("linear", "recurrent layer (LSTM/GRU/RNN): its weights are not normalised (no LCNN form)"),
    nn.MaxPool2d: ("pool", MAX_POOL_REASON),
    nn.AdaptiveMaxPool2d: ("pool", MAX_POOL_REASON),
    CondConv2d: ("conv", "CondConv2d mixes expert kernels per sample; no fixed operator to normalise"),
}


# piecewise-linear activations with no ReLU-like replacement: a centered softplus would drop their saturation
_PIECEWISE_LINEAR: Dict[type, str] = {
    nn.Hardtanh: "clamp to [min_val, max_val]: piecewise linear (not smooth) and saturating; no LCNN replacement",
    nn.Threshold: "x if x > threshold else value: a kink or a jump at the threshold; no LCNN replacement",
}
_GATE_REASON = "sigmoid/tanh-like gate, left alone (smooth, bounded curvature, multiplicative use)"
_HARD_GATE_REASON = ("piecewise-linear gate (hard sigmoid): not smooth, its curvature is unbounded at its two kinks; "
                     "left alone (multiplicative use)")

_TIMM_NORM_MODULES = {
    f"timm.layers.{name}" for name in ("norm", "norm_act", "evo_norm", "filter_response_norm", "inplace_abn")
}


def is_lcnn_layer(module: nn.Module) -> bool:
    """An LCNN layer (centered softplus, gamma-BN, spectral-norm parametrization, ...): converted by definition."""
    return type(module).__module__.startswith(("lcnn_timm.layers", "lcnn_timm.convert"))


def leave_reason(module: nn.Module) -> Optional[Tuple[str, str]]:
    """``(kind, reason)`` for a module the converter leaves alone and reports, or None if it is not reported.

    Only types the conversion did not handle reach here.
    """
    if type(module).__module__.startswith("lcnn_timm.") or isinstance(module, parametrize.ParametrizationList):
        return None  # LCNN layers and the parametrizations inside normalised layers
    if is_spectral_normalized(module):
        return None
    if type(module) in GATES:
        return "gate", _HARD_GATE_REASON if "hard" in type(module).__name__.lower() else _GATE_REASON
    if type(module) in _PIECEWISE_LINEAR:
        return "activation", _PIECEWISE_LINEAR[type(module)]
    for cls, entry in _OUTSIDE_THEORY.items():
        if isinstance(module, cls):
            return entry
    name = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, FUSED_BATCHNORM_ACTS):
        return "batchnorm", f"{name} has a custom forward or no running statistics; not converted"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", f"{name} is not a zero-padded 2d conv of a known forward; not normalised"
    if isinstance(module, nn.Linear):
        return "linear", f"{name} has a custom forward; not normalised"
    if type(module) in ACTIVATIONS:
        return "activation", f"{name} not replaced"
    if "Attention" in name or "Attn" in name:
        return "attention", "attention is outside the LCNN theory"
    if type(module).__module__ in _TIMM_NORM_MODULES:
        return "norm", f"{name} is outside the LCNN theory (only gamma-Lipschitz BatchNorm is covered)"
    return None
