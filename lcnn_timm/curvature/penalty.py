"""The differentiable curvature penalty that LCNN training adds to the loss.

``beta_weight * sum(beta) + gamma_weight * sum(|log gamma|)`` over every
:class:`CenteredSoftplus` and gamma-Lipschitz BatchNorm in the model (the
reference code's proxy for the Theorem-1 expression; see ``proxy.py`` for the
expression itself, which is not a bound). ``|log gamma|`` pulls each gamma towards 1 from either side.
Each module counts once, however often its forward runs.

:func:`add_penalty_to_backward` is the model-side form for trainers that only
compute the classification loss (timm's ``train.py``): the penalty's gradient is
added to the β/γ parameters by the backward of the model's output.
"""
import logging
from typing import NamedTuple, Sequence, Tuple

import torch
from torch import nn

from ..layers.centered_softplus import CenteredSoftplus
from ..layers.gamma_batchnorm import _GammaBatchNorm

__all__ = ["CurvaturePenalty", "add_penalty_to_backward", "curvature_penalty", "lcnn_parameters", "penalty_weights"]

_LOGGER = logging.getLogger("lcnn_timm.penalty")


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


def penalty_weights(value: Sequence[float]) -> Tuple[float, float]:
    """Validate a ``(beta_weight, gamma_weight)`` pair: :func:`lcnn_timm.train.config.penalty_weights`, which the
    torch-free config layer owns (imported at call time: the train package imports this module)."""
    from ..train.config import penalty_weights as validate

    return validate(value)


class _PenaltyGradient(torch.autograd.Function):
    """Identity on the model's output; its backward also returns the penalty's gradient for each β/γ parameter."""

    @staticmethod
    def forward(ctx, output, beta_weight, gamma_weight, num_betas, *log_params):
        ctx.save_for_backward(*log_params)
        ctx.weights, ctx.num_betas = (beta_weight, gamma_weight), num_betas
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        log_params = ctx.saved_tensors
        beta_weight, gamma_weight = ctx.weights
        # d(w * exp(log beta)) / d log beta = w * beta;  d(w * |log gamma|) / d log gamma = w * sign(log gamma)
        grads = [beta_weight * p.exp() for p in log_params[:ctx.num_betas]]
        grads += [gamma_weight * p.sign() for p in log_params[ctx.num_betas:]]
        return (grad_output, None, None, None, *grads)


def _is_primary_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_rank() != 0)


def add_penalty_to_backward(model: nn.Module, beta_weight: float, gamma_weight: float, log_interval: int = 50):
    """Make every training-mode backward through ``model``'s output add the curvature penalty's gradient.

    Gradients then equal those of ``loss + curvature_penalty(model, beta_weight, gamma_weight).total`` when the
    output is used once per backward and the loss is not scaled: exact in fp32/bf16 and under DDP; with fp16
    loss scaling the penalty is effectively divided by the scale, and with gradient accumulation over N steps it
    is applied N times (divide the weights by N). The penalty is not part of the trainer's loss, so its value is
    logged (logger ``lcnn_timm.penalty``, INFO, first training forward and every ``log_interval``-th; primary
    process only; 0: never). Returns the hook's handle (``.remove()`` undoes it).
    """
    beta_weight, gamma_weight = penalty_weights((beta_weight, gamma_weight))
    forwards = 0

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        nonlocal forwards
        if not (module.training and torch.is_grad_enabled()):
            return output
        if log_interval and forwards % log_interval == 0 and _is_primary_process():
            with torch.no_grad():
                value = curvature_penalty(module, beta_weight, gamma_weight)
            _LOGGER.info("curvature penalty %.4g = %g * sum(beta) %.4g + %g * sum|log gamma| %.4g (training forward "
                         "%d; added to the gradients, not to the logged loss)", value.total.item(), beta_weight,
                         value.beta_sum.item(), gamma_weight, value.abs_log_gamma_sum.item(), forwards + 1)
        forwards += 1
        log_betas, log_gammas = lcnn_parameters(module)
        return _PenaltyGradient.apply(output, beta_weight, gamma_weight, len(log_betas), *log_betas, *log_gammas)

    return model.register_forward_hook(hook)
