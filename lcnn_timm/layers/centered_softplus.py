"""Centered beta-softplus, the LCNN activation.

``s(x) = (log(1 + exp(beta * x)) - log 2) / beta``

It is 1-Lipschitz (``s'(x) = sigmoid(beta x)``), maps 0 to 0, tends to ReLU as
beta -> inf and to ``x / 2`` as beta -> 0, and its normalised curvature
``|s''(x)| / |s'(x)| = beta * (1 - sigmoid(beta x))`` never exceeds beta.
"""
import math

import torch
import torch.fx
from timm.layers import register_notrace_module
from torch import nn

__all__ = ["CenteredSoftplus", "centered_softplus"]

# Below this |beta * x| the two-term Taylor series is used: its relative error
# (|t|^3 / 96 < 1.4e-6) is then below the cancellation error of the closed form
# (~1.2e-7 / |t| in fp32), so the result is accurate to ~1e-6 relative
# everywhere, exactly 0 at 0, and tends to x / 2 as beta -> 0.
_TAYLOR_RADIUS = 0.05


def _centered_softplus(x: torch.Tensor, beta: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``(softplus(beta x) - log 2) / beta`` built from vectorised primitives.

    torch's own ``softplus``/``log1p``/``logaddexp`` kernels are ~7x slower than
    ``sigmoid``/``log`` on this CPU, so the closed form used is
    ``(max(t, 0) - log(2 sigmoid(|t|))) / beta``: overflow-free, and exactly 0 at 0.
    ``inplace`` reuses the intermediates' buffers, which is only valid where autograd
    does not record the ops (the fused Function's forward).
    """
    t = x * beta
    abs_t = t.abs()
    if inplace:
        closed_form = t.clamp_min(0).sub_(torch.sigmoid(abs_t).mul_(2).log_()).div_(beta)
        taylor = t.mul_(0.125).add_(0.5).mul_(x)
    else:  # under torch.compile autograd differentiates this composite and needs t and sigmoid(|t|) intact
        closed_form = (t.clamp_min(0) - torch.log(2 * torch.sigmoid(abs_t))) / beta
        taylor = x * (0.5 + 0.125 * t)
    return torch.where(abs_t < _TAYLOR_RADIUS, taylor, closed_form)


class _CenteredSoftplusFn(torch.autograd.Function):
    """Fused autograd for the centered softplus.

    Autograd through the composite keeps every intermediate; this saves only the
    input and the output (the output is kept by the next layer anyway). It also
    runs in the input's dtype: torch's ``softplus`` is on autocast's fp32 list,
    which would up-cast every activation under bf16 autocast.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
        beta = log_beta.exp().to(x.dtype)
        y = _centered_softplus(x, beta, inplace=True)
        ctx.save_for_backward(x, y, log_beta)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, log_beta = ctx.saved_tensors
        slope = torch.sigmoid(x * log_beta.exp().to(x.dtype))
        grad_x = grad_out * slope
        grad_log_beta = None
        if ctx.needs_input_grad[1]:
            # d s / d log_beta = beta * d s / d beta = x s'(x) - s(x)
            ds_dlog_beta = (x * slope).sub_(y)
            grad_log_beta = torch.tensordot(grad_out, ds_dlog_beta, dims=grad_out.dim())
            grad_log_beta = grad_log_beta.to(log_beta.dtype).reshape(log_beta.shape)
        return grad_x, grad_log_beta


@torch.fx.wrap
def centered_softplus(x: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    """Functional centered softplus with ``beta = exp(log_beta)`` (a 0-dim tensor).

    Differentiable in ``x`` and ``log_beta``; a leaf call under ``torch.fx`` tracing.
    """
    if torch.compiler.is_compiling():
        return _centered_softplus(x, log_beta.exp().to(x.dtype))
    return _CenteredSoftplusFn.apply(x, log_beta)


@register_notrace_module
class CenteredSoftplus(nn.Module):
    """Centered softplus with one learnable, positive beta (stored as ``log_beta``).

    Args:
        beta: initial beta (> 0). The reference code starts LCNNs at 5.
        learnable: if False, beta is a buffer and receives no gradient.
        inplace: accepted so the class works as a timm ``act_layer``; ignored,
            since the backward pass needs the input.
    """

    def __init__(self, beta: float = 5.0, learnable: bool = True, inplace: bool = False):
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"CenteredSoftplus: beta must be a finite number > 0, got {beta!r}")
        log_beta = torch.tensor(math.log(beta), dtype=torch.float32)
        if learnable:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)

    @property
    def beta(self) -> torch.Tensor:
        """Current beta as a 0-dim tensor (differentiable when learnable)."""
        return self.log_beta.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return centered_softplus(x, self.log_beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta.item():.4g}, learnable={isinstance(self.log_beta, nn.Parameter)}"
