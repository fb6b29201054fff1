"""Softplus MaxMin: a smooth, 1-Lipschitz MaxMin (GroupSort-2) made of the centered softplus.

MaxMin maps each channel pair ``(a, b)`` to ``(max(a, b), min(a, b))``. In the rotated
coordinates ``p = (a + b) / sqrt 2``, ``q = (a - b) / sqrt 2`` it is ``(p, |q|)``.
``SoftplusMaxMin`` replaces ``|q|`` by ``phi(q) = s(q) + s(-q) = (2 / beta) log cosh(beta q / 2)``,
``s`` the centered softplus, and rotates back:

* 1-Lipschitz: in rotated coordinates the Jacobian is ``diag(1, tanh(beta q / 2))``;
* gradient-norm preserving along ``p``, like MaxMin. This is what lets 1-Lipschitz networks
  fit (Anil, Lucas & Grosse, ICML 2019); an elementwise slope ``s' < 1`` shrinks the signal
  at every layer instead;
* ``||D^2 f|| <= beta / 2`` everywhere (``phi'' = s''(q) + s''(-q) <= 2 * beta / 4``), the
  bound :func:`lcnn_timm.certify.certify` uses (proof: docs/certificates.md);
* MaxMin as ``beta -> inf``.

Channel ``c`` is paired with channel ``c + C/2`` (dimension 1; ``C`` must be even).
``beta`` lives in the inner :class:`CenteredSoftplus` (``self.act``), so the curvature penalty,
``no_weight_decay`` and ``lcnn-timm`` tools that look for centered softplus layers see it.
"""
import math
import torch
from timm.layers import register_notrace_module
from torch import nn

from .centered_softplus import CenteredSoftplus

__all__ = ["SoftplusMaxMin"]

_HALF_SQRT2 = math.sqrt(0.5)


@register_notrace_module  # an fx leaf, like CenteredSoftplus: its channel check is not traceable
class SoftplusMaxMin(nn.Module):
    """Smooth MaxMin over channel pairs ``(c, c + C/2)``; see the module docstring.

    Args:
        beta: initial sharpness (``beta / 2`` bounds the Hessian).
        learnable: train ``beta`` (as ``log_beta`` of the inner :class:`CenteredSoftplus`).
    """

    def __init__(self, beta: float = 1.0, learnable: bool = True):
        super().__init__()
        self.act = CenteredSoftplus(beta, learnable=learnable)

    @property
    def beta(self) -> torch.Tensor:
        return self.act.beta

    def hessian_bound(self) -> torch.Tensor:
        """``beta / 2 >= sup_x ||D^2 f(x)||`` (float64, detached)."""
        return self.act.beta.detach().double() / 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1] if x.dim() > 1 else None
        if channels is None or channels % 2:
            raise ValueError(f"SoftplusMaxMin pairs channel c with c + C/2 (dimension 1), so C must be even; "
                             f"got input shape {tuple(x.shape)}")
        a, b = x.chunk(2, dim=1)
        p = (a + b) * _HALF_SQRT2
        q = (a - b) * _HALF_SQRT2
        smooth_abs = self.act(q) + self.act(-q)
        return torch.cat([(p + smooth_abs) * _HALF_SQRT2, (p - smooth_abs) * _HALF_SQRT2], dim=1)

    def extra_repr(self) -> str:
        return f"pairs=(c, c + C/2), beta={self.act.beta.item():.4g}"

