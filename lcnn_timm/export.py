"""Freeze an LCNN for inference/export: the same eval-mode function with plain torch layers.

* every operator spectral norm is baked into a plain weight ``W / sigma``
  (no per-forward Rayleigh quotient, plain ``state_dict`` keys);
* every gamma-BN becomes a plain affine BatchNorm whose weight and bias carry the
  clip ``min(1, gamma / L)`` (with the running statistics unchanged);
* every BatchNorm2d that only reads a plain convolution's output is folded into
  that convolution (:func:`fold_batchnorms`), and each halves residual block's
  constant scalings into its branches' convolutions (:func:`fold_halves_scalings`);
* optionally, centered softplus activations run as one compiled pass when no
  gradient is recorded (``compiled_activations``).

The result is for inference: training it would train plain BatchNorms without the
clip or the spectral norms, and the certified bounds (`lcnn_timm.certify`) no longer apply to it.
"""
import copy
import warnings
from collections import Counter
from typing import List, Optional

import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .convert.fx_activations import LeafTracer
from .layers.centered_softplus import CenteredSoftplus
from .layers.halves_residual import FoldedHalvesResidual, HalvesResidual
from .layers.gamma_batchnorm import GammaBatchNorm1d, GammaBatchNorm2d, _GammaBatchNorm, _gamma_clip
from .layers.spectral_norm import remove_spectral_norms

__all__ = ["fold_batchnorms", "fold_halves_scalings", "freeze"]

# convolutions whose forward uses ``self.weight`` / ``self.bias`` as they are (StdConv2d, for one, does not)
_FOLDABLE_CONV_FORWARDS = (nn.Conv2d.forward, Conv2dSame.forward)

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


def _plain_conv(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward in _FOLDABLE_CONV_FORWARDS
        and not parametrize.is_parametrized(module)
    )


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        _plain_conv(conv)
        and type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> int:
    """Fold each eval-mode ``BatchNorm2d`` that is the only reader of a plain conv's output into the conv, in place.

    The pairs are found on the model's ``torch.fx`` graph (timm's leaf modules); each
    BatchNorm becomes ``nn.Identity`` and its conv gets the scaled weight and a bias.
    Convs or BatchNorms called more than once are left alone, as is every model that
    cannot be traced (with a warning). Returns the number of BatchNorms folded.
    """
    try:
        graph = LeafTracer().trace(model)
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        warnings.warn(f"fold_batchnorms: the model cannot be traced with torch.fx ({type(error).__name__}: {error}); "
                      "no BatchNorm folded", RuntimeWarning, stacklevel=2)
        return 0
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded = 0
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv, bn = modules[source.target], modules[node.target]
        if calls[source.target] != 1 or calls[node.target] != 1 or not _foldable(conv, bn):
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        model.set_submodule(node.target, nn.Identity())
        folded += 1
    return folded


def _call_order_leaves(module: nn.Module) -> Optional[List[nn.Module]]:
    """The non-identity modules a branch applies, in order, if it is a tree of plain ``nn.Sequential``s."""
    if type(module).forward is nn.Sequential.forward:
        leaves = [_call_order_leaves(child) for child in module]
        return None if any(part is None for part in leaves) else [leaf for part in leaves for leaf in part]
    if isinstance(module, nn.Identity):
        return []
    return None if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) else [module]


@torch.no_grad()
def _scale_branch(leaves: List[nn.Module], input_scale: float, output_scale: float) -> None:
    first, last = leaves[0], leaves[-1]
    first.weight.mul_(input_scale)  # conv(a x) = (a W) x + b
    last.weight.mul_(output_scale)  # b' (W x + c) = (b' W) x + b' c
    if last.bias is not None:
        last.bias.mul_(output_scale)


def fold_halves_scalings(model: nn.Module) -> int:
    """Replace each :class:`HalvesResidual` whose branches can absorb its scalings by a :class:`FoldedHalvesResidual`.

    A branch can when it is a tree of ``nn.Sequential``s that starts and ends with a plain
    convolution (BatchNorms already folded, no activation after the last conv); an
    identity shortcut takes its scaling as ``torch.add``'s ``alpha``. In place; returns
    the number of blocks replaced.
    """
    folded = 0
    for name, block in list(model.named_modules()):
        if type(block) is not HalvesResidual:
            continue
        residual, shortcut = _call_order_leaves(block.residual), _call_order_leaves(block.shortcut)
        if not residual or shortcut is None:
            continue
        if not all(_plain_conv(end) for branch in (residual, shortcut) for end in branch[:1] + branch[-1:]):
            continue
        _scale_branch(residual, block.input_scale, block.output_scale)
        if shortcut:
            _scale_branch(shortcut, block.input_scale, block.output_scale)
        shortcut_scale = 1.0 if shortcut else block.input_scale * block.output_scale
        model.set_submodule(name, FoldedHalvesResidual(block.residual, block.shortcut, block.act, shortcut_scale))
        folded += 1
    return folded


def freeze(
        model: nn.Module, inplace: bool = False, fold: bool = True, compiled_activations: bool = False,
) -> nn.Module:
    """``model`` in eval mode with spectral norms baked in and gamma-BNs turned into plain BatchNorms.

    Args:
        model: any module (an LCNN from the registry or a converted timm model).
        inplace: modify ``model`` itself instead of a deep copy.
        fold: fold BatchNorms into the convolutions before them (:func:`fold_batchnorms`), then the halves
            blocks' scalings into their convolutions (:func:`fold_halves_scalings`).
        compiled_activations: make every :class:`~lcnn_timm.layers.CenteredSoftplus` run as one
            ``torch.compile``-generated pass under ``torch.no_grad``/``torch.inference_mode``
            (compiles on the first call; needs a C++ compiler, else warns and stays eager).

    Returns:
        The frozen model, in eval mode, computing the same eval-mode outputs (to float rounding).
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    remove_spectral_norms(model)
    _replace_gamma_batchnorms(model)
    if fold:
        fold_batchnorms(model)
        fold_halves_scalings(model)
    for module in model.modules():
        if isinstance(module, CenteredSoftplus):
            module.compiled_inference = compiled_activations
    return model
