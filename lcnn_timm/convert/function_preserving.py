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

Whether the result keeps the function is then known from the report
(:func:`assess_preservation`): approximately (within log(2)/beta per
activation) when every replaced activation was a ReLU and every 1/sigma but the
classifier's was absorbed: conv -> BN -> ReLU networks. Not for GELU/SiLU
models, squeeze-excite gates, norms or attention fed by unabsorbed scales.
"""
import math
from collections import Counter
from typing import Dict, Iterable, Sequence

import torch
from torch import nn

from ..layers.gamma_batchnorm import _GammaBatchNorm, batchnorm_lipschitz
from ..layers.spectral_norm import operator_norm
from .probe import ProbeResult, run_once
from .report import Compensation, ConversionReport, Preservation

__all__ = ["absorb_spectral_scales", "assess_preservation", "open_gamma_clips", "relative_deviation"]

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


# what a ReLU was reported as (module, function, method): the centered softplus is within log(2)/beta of it
_RELU_NAMES = {"ReLU", "relu()", "relu_()", ".relu()", ".relu_()"}
# left alone without changing the function
_NEUTRAL_KINDS = {"pool", "note"}


def assess_preservation(report: ConversionReport, classifier: Iterable[str], function_preserving: bool) -> Preservation:
    """Whether the converted model is expected to compute the original's eval function, from what the report says.

    ``classifier``: the names of the classifier's layers, whose 1/sigma only rescales the logits.
    """
    if not function_preserving:
        return Preservation(False, "function_preserving=False: the 1/sigma of the spectral norms is not absorbed")
    acts = [r for r in report.replaced if r.new.startswith(("CenteredSoftplus", "PositiveSoftplus"))]
    other_acts = Counter(r.old for r in acts if r.old not in _RELU_NAMES)
    left = Counter(e.kind for e in report.left_alone if e.kind not in _NEUTRAL_KINDS)
    classifier = set(classifier)
    unabsorbed = [c.name for c in report.uncompensated if c.name not in classifier]
    problems = []
    if other_acts:
        replaced = ", ".join(f"{n} {old}" for old, n in sorted(other_acts.items()))
        problems.append(f"not ReLU, so changed at any beta: {replaced}")
    if unabsorbed:
        problems.append(f"{len(unabsorbed)} layer(s) before no BatchNorm keep 1/sigma (e.g. {unabsorbed[0]})")
    if left:
        problems.append("left alone: " + ", ".join(f"{n} {k}" for k, n in sorted(left.items())))
    if problems:
        return Preservation(False, "; ".join(problems))
    if not acts:
        return Preservation(True, "exact: no activation replaced and every 1/sigma absorbed (or in the classifier)")
    return Preservation(True, f"approximate: {len(acts)} ReLU -> centered softplus, each within log(2)/beta; every "
                              "other 1/sigma absorbed by a BatchNorm (the classifier's rescales the logits)")


def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's pre-logit features (the classifier's unabsorbed 1/sigma only rescales the logits), else the output."""
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model(x)


def relative_deviation(original: nn.Module, converted: nn.Module, input_size: Sequence[int], batch: int = 4) -> float:
    """``max |f'(x) - f(x)| / max |f(x)|`` in eval mode on one random normal batch, where ``f`` is a timm model's
    pre-logit features and other models' output."""
    outputs = [run_once(model, input_size, batch, torch.Generator().manual_seed(0), _pre_logits)
               for model in (original, converted)]
    reference, output = (out.double() for out in outputs)
    return float((output - reference).abs().max() / reference.abs().max())
