"""Spectral normalisation of every conv and linear by its true operator norm.

Weight-standardised convs (timm's ``StdConv2d``/``ScaledStdConv2d`` and their
"Same" variants) compute their forward with a standardised weight, so their
norm must be that of the standardised weight: they become a plain conv whose
``weight`` parametrization chain first standardises, then divides by the
operator norm.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from torch import nn
from torch.nn.utils import parametrize

from ..layers.spectral_norm import is_spectral_normalized, spectral_norm
from .catalog import LINEARS, PLAIN_CONVS, STANDARDIZED_CONVS
from .probe import ProbeResult
from .report import ConversionReport
from .tree import slots

__all__ = ["WeightStandardization", "normalize_layers"]


class WeightStandardization(nn.Module):
    """Parametrization: standardise each output filter to zero mean and unit variance (times ``gain * scale``).

    Computes exactly what timm's ``StdConv2d`` (no gain) and ``ScaledStdConv2d``
    (learnable per-filter ``gain`` times the fixed ``scale``) compute in their forward.
    """

    def __init__(self, eps: float, gain: Optional[nn.Parameter] = None, scale: float = 1.0):
        super().__init__()
        self.eps = eps
        self.scale = scale
        self.gain = gain

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        affine = None if self.gain is None else (self.gain * self.scale).view(-1)
        flat = weight.reshape(1, weight.shape[0], -1)
        return F.batch_norm(flat, None, None, weight=affine, training=True, momentum=0.0, eps=self.eps).reshape_as(
            weight
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, scaled={self.gain is not None}"


def _unstandardized(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain conv (``Conv2dSame`` for dynamic "same" padding) sharing ``conv``'s parameters, weight standardised."""
    dynamic_same = getattr(conv, "same_pad", False)
    cls = Conv2dSame if dynamic_same else nn.Conv2d
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=0 if dynamic_same else conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    new.weight = conv.weight
    new.bias = conv.bias
    gain = getattr(conv, "gain", None)
    standardization = WeightStandardization(conv.eps, gain, getattr(conv, "scale", 1.0) if gain is not None else 1.0)
    parametrize.register_parametrization(new, "weight", standardization)
    new.train(conv.training)
    return new


def _revive_zero_operator(layer: nn.Module) -> Optional[str]:
    """Give a layer whose (standardised) weight is all zero a non-zero one; what was done, or None.

    timm zero-initialises some layers (resmlp's head, the gain of NF-ResNets' last conv per block) so that they
    start as no-ops; their spectral normalisation is undefined (sigma = 0), and near it the gradient of
    ``W / sigma`` is ``1 / sigma``: 2e12 and 1.7e6 in the first steps of resmlp_12 and nf_resnet26, which then
    diverged (issue 24). A normalised layer has norm 1 at any scale, so the zero start cannot be kept: a zero
    gain is set to 1, a zero weight gets torch's default initialisation.
    """
    with torch.no_grad():
        if layer.weight.abs().max() > 0:  # through the standardisation parametrization, if any
            return None
        standardization = layer.parametrizations.weight[0] if parametrize.is_parametrized(layer, "weight") else None
        gain = getattr(standardization, "gain", None)
        if gain is not None and not gain.abs().max() > 0:
            gain.fill_(1.0)
            if layer.weight.abs().max() > 0:
                return "zero-initialised gain set to 1"
        raw = layer.parametrizations.weight.original if standardization is not None else layer.weight
        nn.init.kaiming_uniform_(raw, a=math.sqrt(5))  # nn.Conv2d's / nn.Linear's own default
        return "zero-initialised weight re-initialised (torch's default)"


def normalize_layers(
    model: nn.Module, probed: ProbeResult, init_iterations: int, report: ConversionReport
) -> Dict[nn.Module, nn.Module]:
    """Spectrally normalise convs (at their probed input size) and linears, in place.

    Returns the map from each original layer to the normalised one (itself, or
    the plain conv that replaced a weight-standardised one).
    """
    done: Dict[nn.Module, nn.Module] = {}
    for slot in slots(model):
        layer = slot.child
        kind = type(layer)
        if kind not in PLAIN_CONVS + STANDARDIZED_CONVS + LINEARS or is_spectral_normalized(layer):
            continue
        if layer not in done:
            size = None
            if kind not in LINEARS:
                sizes = probed.spatial_sizes(layer)
                if layer.padding_mode != "zeros":
                    report.leave(slot.name, kind.__name__, "conv", f"padding_mode={layer.padding_mode!r} (only zeros)")
                    continue
                if len(sizes) != 1:
                    why = "never ran in the dummy forward" if not sizes else f"ran at several input sizes {sizes}"
                    report.leave(slot.name, kind.__name__, "conv", f"{why}: its operator norm is undefined")
                    continue
                size = sizes[0]
            new = _unstandardized(layer) if kind in STANDARDIZED_CONVS else layer
            revived = _revive_zero_operator(new)
            spectral_norm(new, size, init_iterations=init_iterations)
            done[layer] = new
            chain = "standardised, then " if new is not layer else ""
            revived = f"; {revived}" if revived else ""
            report.replace(slot.name, kind.__name__,
                           f"{type(new).__name__.removeprefix('Parametrized')} ({chain}spectral-normalised{revived})")
        slot.set(done[layer])
    return done
