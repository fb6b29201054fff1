"""The differentiable curvature penalty that LCNN training adds to the loss.

``beta_weight * sum(beta) + gamma_weight * sum(|log gamma|)`` over every
:class:`CenteredSoftplus` and gamma-Lipschitz BatchNorm in the model (the
reference code's proxy for the bound of Theorem 1; see ``bound.py`` for the
bound itself). ``|log gamma|`` pulls each gamma towards 1 from either side.
Each module counts once, however often its forward runs.
"""
from typing import NamedTuple

import torch
from torch import nn

from ..layers.centered_softplus import CenteredSoftplus
from ..layers.gamma_batchnorm import _GammaBatchNorm

__all__ = ["CurvaturePenalty", "curvature_penalty", "lcnn_parameters"]


class CurvaturePenalty(NamedTuple):
    """The weighted total and its two unweighted parts."""

    total: torch.Tensor
    beta_sum: torch.Tensor
    abs_log_gamma_sum: torch.Tensor


def lcnn_parameters(model: nn.Module):
    """The (log beta, log gamma) parameters of ``model``, as two lists."""
    betas = [m.log_beta for m in model.modules() if isinstance(m, CenteredSoftplus)]
    gammas = [m.log_gamma for m in model.modules() if isinstance(m, _GammaBatchNorm)]
    return betas, gammas


def curvature_penalty(model: nn.Module, beta_weight: float = 1e-3, gamma_weight: float = 1e-3) -> CurvaturePenalty:
    """``beta_weight * sum(beta) + gamma_weight * sum(|log gamma|)`` for ``model``.

    Defaults are the weights of the reference script tied to the paper's Table 1
    (1e-3 each; the reference CLI's later default is 1e-2).
    """
    log_betas, log_gammas = lcnn_parameters(model)
    device = next(model.parameters()).device
    beta_sum = torch.stack([b.exp() for b in log_betas]).sum() if log_betas else torch.zeros((), device=device)
    gamma_sum = torch.stack([g.abs() for g in log_gammas]).sum() if log_gammas else torch.zeros((), device=device)
    return CurvaturePenalty(beta_weight * beta_sum + gamma_weight * gamma_sum, beta_sum, gamma_sum)
