"""Function-preserving conversion of pretrained weights.

Spectral normalisation divides a layer's weight by its operator norm sigma, so
the layer's output shrinks by 1/sigma. When that output goes only to a
BatchNorm, the BatchNorm undoes it exactly: with the running mean divided by
sigma and the running variance and eps by sigma^2,

    BN'(y / sigma) = w (y / sigma - m / sigma) / sqrt(v / sigma^2 + eps / sigma^2) + b = BN(y)

in eval mode, and in training mode too (batch statistics scale the same way).
Every gamma-BN's gamma is then raised to at least its Lipschitz constant so
that the clip is inactive. A layer with no such BatchNorm (a classifier, a conv
followed by an activation or a LayerNorm) keeps the 1/sigma scale; it is
reported with its sigma.
"""
import math
from typing import Dict

import torch
from torch import nn

from ..layers.gamma_batchnorm import _GammaBatchNorm, batchnorm_lipschitz
from ..layers.spectral_norm import operator_norm
from .probe import ProbeResult
from .report import Compensation, ConversionReport

__all__ = ["absorb_spectral_scales", "open_gamma_clips"]

# gamma is set this far above the Lipschitz constant so rounding cannot activate the clip
_GAMMA_MARGIN = 1.001


@torch.no_grad()
def absorb_spectral_scales(
    model: nn.Module,
    probed: ProbeResult,
    normalized: Dict[nn.Module, nn.Module],
    gamma_bns: Dict[nn.Module, _GammaBatchNorm],
    report: ConversionReport,
) -> None:
    """Fold each normalised layer's 1/sigma into the gamma-BN that alone consumes its output."""
    names = {module: name for name, module in model.named_modules(remove_duplicate=False)}
    for original, layer in normalized.items():
        sigma = float(operator_norm(layer))
        bn = gamma_bns.get(probed.feeds_batchnorm.get(original))
        if bn is None:
            report.compensations.append(Compensation(names.get(layer, "?"), sigma, ""))
            continue
        if layer.bias is not None:
            layer.bias.div_(sigma)
        bn.running_mean.div_(sigma)
        bn.running_var.div_(sigma**2)
        bn.eps /= sigma**2
        report.compensations.append(Compensation(names.get(layer, "?"), sigma, names.get(bn, "?")))


@torch.no_grad()
def open_gamma_clips(model: nn.Module, gamma: float) -> None:
    """Set every gamma-BN's gamma to ``max(gamma, Lipschitz constant)`` (times a margin) so no clip is active."""
    for module in model.modules():
        if isinstance(module, _GammaBatchNorm):
            needed = max(gamma, _GAMMA_MARGIN * float(batchnorm_lipschitz(module)))
            module.log_gamma.fill_(math.log(needed))
