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


@register_notrace_module  # an fx leaf in timm's feature extraction, like CenteredSoftplus
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
        if isinstance(x, torch.Tensor) and (x.dim() < 2 or x.shape[1] % 2):  # fx tracing passes a Proxy: no check
            raise ValueError("SoftplusMaxMin pairs channel c with c + C/2 (dimension 1), so C must be even; "
                             "got input shape " + str(list(x.shape)))
        # split, not two slices: the slices' backward fills a zero tensor of the input's size each (17% of a
        # float64 certification's time), split's concatenates the two gradients
        a, b = x.split(x.shape[1] // 2, dim=1)
        scale = math.sqrt(0.5)  # computed here: TorchScript cannot read module-level floats
        p = (a + b) * scale
        q = (a - b) * scale
        smooth_abs = self.act(q) + self.act(-q)
        return torch.cat([(p + smooth_abs) * scale, (p - smooth_abs) * scale], dim=1)

    def extra_repr(self) -> str:
        return f"pairs=(c, c + C/2), beta={self.act.beta.item():.4g}"
