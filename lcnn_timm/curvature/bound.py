"""Data-free upper bound on a model's normalised curvature (the paper's Theorem 1).

For a chain ``f = f_L o ... o f_1``::

    max_x C_f(x) <= sum_i C_i * prod_{j <= i} Lip_j

with ``C_i`` the curvature bound of layer ``i`` (beta for a centered softplus,
0 for affine layers) and ``Lip_j`` the Lipschitz constants. Chains compose as
``(L, K) = (L_a L_b, K_a + L_a K_b)`` where ``K`` is a chain's bound; the
halves residual block is ``duplicate (isometry) -> block-diag(F, S)
(L = max, K = max) -> average of halves (1/sqrt 2) -> activation``.

Supported leaves: centered softplus (1, beta), gamma-BN (min(gamma, ||BN||), 0),
spectrally normalised convs/linears (1, 0: the weight is divided by its
operator norm), average pooling, flatten, identity and dropout (<= 1, 0).
Anything else (plain convs, plain BatchNorm, ReLU, max-pool, attention, ...)
raises :class:`UnsupportedStructureError` naming the module.

Assumption: the power iteration has converged, so a normalised layer's norm is 1.
"""
import math
from typing import Iterable, NamedTuple, Tuple

import torch
from torch import nn

from ..layers.centered_softplus import CenteredSoftplus
from ..layers.gamma_batchnorm import _GammaBatchNorm
from ..layers.halves_residual import HalvesResidual
from ..layers.spectral_norm import is_spectral_normalized

__all__ = ["LayerBound", "UnsupportedStructureError", "curvature_upper_bound", "layer_bound"]


class UnsupportedStructureError(ValueError):
    """The model contains a layer or a connection the curvature bound does not cover."""


class LayerBound(NamedTuple):
    """Lipschitz constant and curvature bound (``sum_i C_i prod_{j<=i} L_j``) of a map."""

    lipschitz: torch.Tensor
    curvature: torch.Tensor

    def then(self, other: "LayerBound") -> "LayerBound":
        """The bound of ``other o self``."""
        return LayerBound(self.lipschitz * other.lipschitz, self.curvature + self.lipschitz * other.curvature)


def _one() -> torch.Tensor:
    return torch.tensor(1.0)


def _zero() -> torch.Tensor:
    return torch.tensor(0.0)


_UNIT_LIPSCHITZ_LEAVES = (
    nn.Identity,
    nn.Flatten,
    nn.Dropout,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,  # averaging k values has norm 1/sqrt(k) <= 1 (Young's inequality)
)


def _chain(named_modules: Iterable[Tuple[str, nn.Module]]) -> LayerBound:
    total = LayerBound(_one(), _zero())
    for name, module in named_modules:
        total = total.then(layer_bound(module, name))
    return total


def layer_bound(module: nn.Module, name: str = "model") -> LayerBound:
    """Bound of one module, recursing through chains and halves blocks."""
    if isinstance(module, CenteredSoftplus):
        return LayerBound(_one(), module.beta.detach().cpu())
    if isinstance(module, _GammaBatchNorm):
        return LayerBound(module.lipschitz_constant().detach().cpu(), _zero())
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if not is_spectral_normalized(module):
            raise UnsupportedStructureError(
                f"{name} ({type(module).__name__}) is not spectrally normalised, so its Lipschitz constant is unbounded"
            )
        return LayerBound(_one(), _zero())
    if isinstance(module, HalvesResidual):
        residual = layer_bound(module.residual, f"{name}.residual")
        shortcut = layer_bound(module.shortcut, f"{name}.shortcut")
        branches = LayerBound(
            torch.maximum(residual.lipschitz, shortcut.lipschitz), torch.maximum(residual.curvature, shortcut.curvature)
        )
        merge = LayerBound(torch.tensor(1.0 / math.sqrt(2.0)), _zero())
        return branches.then(merge).then(layer_bound(module.act, f"{name}.act"))
    if isinstance(module, _UNIT_LIPSCHITZ_LEAVES):
        return LayerBound(_one(), _zero())
    if hasattr(module, "bound_chain"):  # models declare their forward order
        return _chain((f"{name}.{child_name}", child) for child_name, child in module.bound_chain())
    if isinstance(module, nn.Sequential):
        return _chain((f"{name}.{child_name}", child) for child_name, child in module.named_children())
    raise UnsupportedStructureError(
        f"{name} ({type(module).__name__}) is outside the curvature bound's theory: only chains of centered "
        "softplus, gamma-BN, spectrally normalised conv/linear, average pooling and halves residual blocks are covered"
    )


@torch.no_grad()
def curvature_upper_bound(model: nn.Module) -> float:
    """Data-free upper bound on ``max_x C_f(x)`` for ``model`` (Theorem 1), as a float."""
    return float(layer_bound(model, type(model).__name__).curvature)
