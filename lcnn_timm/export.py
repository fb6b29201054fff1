"""Freeze an LCNN for inference/export: the same eval-mode function with plain torch layers.

* every operator spectral norm is baked into a plain weight ``W / sigma``
  (no per-forward Rayleigh quotient, plain ``state_dict`` keys);
* every gamma-BN becomes a plain affine BatchNorm whose weight and bias carry the
  clip ``min(1, gamma / L)`` (with the running statistics unchanged).

The result is for inference: training it would train plain BatchNorms without the
clip or the spectral norms, and the curvature bound no longer applies to it.
"""
import copy

import torch
from torch import nn

from .layers.gamma_batchnorm import GammaBatchNorm1d, GammaBatchNorm2d, _GammaBatchNorm, _gamma_clip
from .layers.spectral_norm import remove_spectral_norms

__all__ = ["freeze"]

_PLAIN_BN = {GammaBatchNorm1d: nn.BatchNorm1d, GammaBatchNorm2d: nn.BatchNorm2d}


@torch.no_grad()
def _plain_batchnorm(bn: _GammaBatchNorm) -> nn.modules.batchnorm._BatchNorm:
    """An affine BatchNorm equal to ``bn`` in eval mode."""
    plain_cls = next(plain for gamma_cls, plain in _PLAIN_BN.items() if isinstance(bn, gamma_cls))
    ref = bn.running_var
    plain = plain_cls(bn.num_features, bn.eps, bn.momentum, affine=True, device=ref.device, dtype=ref.dtype)
    clip = _gamma_clip(bn.log_gamma, bn.running_var, bn.weight, bn.eps).to(ref.dtype)
    plain.weight.copy_(clip * (bn.weight if bn.weight is not None else 1.0))
    plain.bias.copy_(clip * (bn.bias if bn.bias is not None else 0.0))
    plain.running_mean.copy_(bn.running_mean)
    plain.running_var.copy_(bn.running_var)
    plain.num_batches_tracked.copy_(bn.num_batches_tracked)
    return plain.eval()


def _replace_gamma_batchnorms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, _GammaBatchNorm):
            setattr(module, name, _plain_batchnorm(child))
        else:
            _replace_gamma_batchnorms(child)


def freeze(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` in eval mode with spectral norms baked in and gamma-BNs turned into plain BatchNorms.

    Args:
        model: any module (an LCNN from the registry or a converted timm model).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The frozen model, in eval mode, computing the same eval-mode outputs.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    remove_spectral_norms(model)
    _replace_gamma_batchnorms(model)
    return model
