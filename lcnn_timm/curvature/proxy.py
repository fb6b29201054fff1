"""The paper's Theorem-1 expression: the quantity LCNN training penalises. It is NOT an upper bound.

For a chain ``f = f_L o ... o f_1`` the expression is

    sum_i beta_i * prod_{j <= i} Lip_j

with ``beta_i`` the centered softplus betas (0 for affine layers) and ``Lip_j`` the
layers' Lipschitz constants, taking every spectrally normalised conv/linear as
exactly 1 (the power-iteration estimate) and pooling as <= 1. Chains compose as
``(L, K) = (L_a L_b, K_a + L_a K_b)``; a halves block is ``duplicate -> block-diag(F, S)
(L = max, K = max) -> average of halves (1/sqrt 2) -> activation``.

Why it bounds nothing: the normalised curvature ``C_f(x) = ||H_f(x)|| / (||grad f(x)|| + eps)``
is unbounded wherever the gradient vanishes and the Hessian does not, which
smooth networks do. ``spectral_norm(Linear(1, 2)) -> CenteredSoftplus(5) ->
spectral_norm(Linear(2, 1))`` with weights ``[[1], [-1]]`` and ``[[1, 1]]`` has this
expression equal to 5 but ``f'(0) = 0``, ``f''(0) = 0.884``: ``C_f(0) = 8.8e5``
(docs/certificates.md). Certified guarantees are in :mod:`lcnn_timm.certify`.

Covered layers are those of :mod:`lcnn_timm.certify.structure`; anything else raises
:class:`UnsupportedStructureError` naming the first offending module.
"""
from typing import NamedTuple

import torch
from torch import nn

from ..certify.structure import Rules, UnsupportedStructureError, compose
from ..layers.centered_softplus import CenteredSoftplus
from ..layers.gamma_batchnorm import _GammaBatchNorm
from ..layers.softplus_maxmin import SoftplusMaxMin

__all__ = ["ProxyTerms", "UnsupportedStructureError", "curvature_proxy", "layer_proxy"]


class ProxyTerms(NamedTuple):
    """Lipschitz factor and Theorem-1 sum ``sum_i C_i prod_{j<=i} L_j`` of a map."""

    lipschitz: torch.Tensor
    curvature: torch.Tensor

    def then(self, other: "ProxyTerms") -> "ProxyTerms":
        """The terms of ``other o self``."""
        return ProxyTerms(self.lipschitz * other.lipschitz, self.curvature + self.lipschitz * other.curvature)


class _ProxyRules(Rules[ProxyTerms]):
    identity = ProxyTerms(torch.tensor(1.0), torch.tensor(0.0))

    def leaf(self, module: nn.Module, name: str) -> ProxyTerms:
        if isinstance(module, (CenteredSoftplus, SoftplusMaxMin)):  # the penalty's beta, as for a softplus
            return ProxyTerms(torch.tensor(1.0), module.beta.detach().cpu())
        if isinstance(module, _GammaBatchNorm):
            return ProxyTerms(module.lipschitz_constant().detach().cpu(), torch.tensor(0.0))
        return self.identity  # normalised conv/linear (taken as exactly 1), pooling (<= 1), identity, flatten

    def then(self, first: ProxyTerms, second: ProxyTerms) -> ProxyTerms:
        return first.then(second)

    def halves(self, residual: ProxyTerms, shortcut: ProxyTerms, block) -> ProxyTerms:
        branches = ProxyTerms(torch.maximum(residual.lipschitz, shortcut.lipschitz),
                              torch.maximum(residual.curvature, shortcut.curvature))
        # duplication x -> (a x, a x) has norm a sqrt 2, the merge b (u + v) norm b sqrt 2: 1/sqrt 2 by default
        merge = 2.0 * abs(float(block.input_scale)) * abs(float(block.output_scale))
        return branches.then(ProxyTerms(torch.tensor(merge), torch.tensor(0.0)))


def layer_proxy(module: nn.Module, name: str = "model") -> ProxyTerms:
    """Theorem-1 terms of one module, recursing through chains and halves blocks."""
    return compose(module, name, _ProxyRules())


@torch.no_grad()
def curvature_proxy(model: nn.Module) -> float:
    """The paper's Theorem-1 expression for ``model``, as a float: what LCNN training keeps small.

    Not an upper bound on ``max_x C_f(x)`` (no data-free bound exists, see the module
    docstring); for guarantees use :func:`lcnn_timm.certify.certify`.
    """
    return float(layer_proxy(model, type(model).__name__).curvature)
