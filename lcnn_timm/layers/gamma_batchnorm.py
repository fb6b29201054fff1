"""gamma-Lipschitz BatchNorm: BatchNorm whose Lipschitz constant is clipped to a learnable gamma.

Definition implemented (paper and reference code agree once ``||BN||`` is read as
the operator norm of the eval-mode BN map):

    gamma_bn(x) = bn(x) * min(1, gamma / L),   L = max_c |w_c| / sqrt(running_var_c + eps)

``w`` is the affine weight (1 when ``affine=False``, as in the reference code); the
bias does not change the Lipschitz constant.

In training mode BN normalises by the batch variance, and ``L`` is taken from that
same batch variance (held constant, like the running statistics in eval mode): the
clip is then the Lipschitz constant of the map actually applied, in both modes. The
reference code reads the *running* variance in training too (spec decision 4); that
makes the training-mode function depend on an exponential average that lags the
activations by orders of magnitude early on (BN starts it at 1, activations here
have variances near 1e-4), so the network trains with its clips open and the
evaluated network (running or re-estimated statistics) has them closed. On the quick
config that mismatch gave 71.2% in one precision and 13.95% in another
(docs/layers.md, "gamma-BN in training mode").
"""
import math
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GammaBatchNorm1d", "GammaBatchNorm2d", "batchnorm_lipschitz"]


def _lipschitz(running_var: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight.abs()
    return scale.max()


def batchnorm_lipschitz(bn: _BatchNorm) -> torch.Tensor:
    """Lipschitz constant of an eval-mode BatchNorm: ``max_c |w_c| / sqrt(var_c + eps)``."""
    if bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} tracks no running statistics; its eval Lipschitz constant is undefined")
    return _lipschitz(bn.running_var, bn.weight, bn.eps)


@torch.fx.wrap
def _gamma_clip(log_gamma: torch.Tensor, variance: torch.Tensor, weight: Optional[torch.Tensor], eps: float):
    """``min(1, gamma / L)`` with ``L`` from ``variance`` (running or batch); an fx leaf so that traced graphs read
    the live statistics.

    Written as ``gamma / max(gamma, L)``: the same value, but finite gradients where ``L = 0`` (timm
    zero-initialises the last BN weight of residual blocks), where ``clamp(gamma / L, max=1)`` gives
    ``inf * 0 = NaN``.
    """
    gamma = log_gamma.exp()
    return gamma / torch.maximum(gamma, _lipschitz(variance, weight, eps))


@torch.fx.wrap
def _batch_variance(input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float):
    """The batch's per-channel (biased) variance, which training-mode BN divides by, in float32 or wider; updates
    the running statistics in place as torch's BatchNorm does (``(1 - momentum) stat + momentum batch_stat``,
    unbiased variance)."""
    count = input.numel() // input.shape[1]
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
    stats_input = input.detach()
    if stats_input.dtype in (torch.bfloat16, torch.float16):  # reduced-precision activations: statistics in fp32
        stats_input = stats_input.float()
    # one Welford pass (the kernel SyncBatchNorm uses), exact where the mean is many standard deviations:
    # E[x^2] - E[x]^2 from two plain reductions was 1.5x faster but lost 0.4% of the variance at a mean of 17
    # std devs over 128x32x32 values per channel (float32), and torch.var_mean over (N, H, W) is 3x slower
    # (AMD EPYC, one thread, docs/layers.md)
    return torch.batch_norm_update_stats(stats_input, running_mean, running_var, momentum)[1]


class _GammaBatchNorm(_BatchNorm):
    """Shared implementation; subclasses fix the accepted input ranks."""

    _valid_ranks: tuple = ()

    def __init__(
        self,
        num_features: int,
        gamma: float = 10.0,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = False,
        device=None,
        dtype=None,
    ):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"{type(self).__name__}: gamma must be a finite number > 0, got {gamma!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma), dtype=torch.float32, device=device))

    @property
    def gamma(self) -> torch.Tensor:
        """Current gamma (the Lipschitz cap) as a 0-dim tensor."""
        return self.log_gamma.exp()

    def lipschitz_constant(self) -> torch.Tensor:
        """Lipschitz constant of this layer in eval mode: ``min(gamma, L_bn)``."""
        return torch.minimum(self.gamma, batchnorm_lipschitz(self))

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if isinstance(input, torch.fx.Proxy):  # shapes are unknown while tracing
            return
        if input.dim() not in self._valid_ranks:
            raise ValueError(
                f"{type(self).__name__} expects a {' or '.join(f'{r}D' for r in self._valid_ranks)} input "
                f"(batch, channels, ...), got shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {input.shape[1]} channels (input shape {tuple(input.shape)})"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # _BatchNorm.forward's logic for always-tracked statistics, without super() (TorchScript has none). The
        # clip is folded into batch_norm's affine map instead of scaling its output: three elementwise passes
        # (forward and backward) fewer, for the one extra reduction pass that gives the batch variance.
        if not torch.jit.is_scripting():  # it handles fx proxies, which TorchScript cannot compile
            self._check_input_dim(input)
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in torch's BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
            else:
                momentum = self.momentum
            variance = _batch_variance(input, self.running_mean, self.running_var, momentum)
        else:
            variance = self.running_var
        clip = _gamma_clip(self.log_gamma, variance, self.weight, self.eps)
        # a real (C,) tensor: eval batch_norm's backward mis-reads an expanded (stride-0) weight (torch 2.14, CPU)
        weight = clip.repeat([self.num_features]) if self.weight is None else self.weight * clip
        bias = None if self.bias is None else self.bias * clip
        if self.training:
            return F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)
        return F.batch_norm(input, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma.item():.4g}"


@register_notrace_module
class GammaBatchNorm1d(_GammaBatchNorm):
    """gamma-Lipschitz BatchNorm for (N, C) or (N, C, L) inputs."""

    _valid_ranks = (2, 3)


@register_notrace_module
class GammaBatchNorm2d(_GammaBatchNorm):
    """gamma-Lipschitz BatchNorm for (N, C, H, W) inputs."""

    _valid_ranks = (4,)
