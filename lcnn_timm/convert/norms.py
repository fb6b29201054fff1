"""BatchNorm (plain and timm's fused norm + act) -> gamma-Lipschitz BatchNorm."""
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import nn

from ..layers.gamma_batchnorm import GammaBatchNorm1d, GammaBatchNorm2d, _GammaBatchNorm
from .catalog import FUSED_BATCHNORM_ACTS, PLAIN_BATCHNORMS
from .probe import ProbeResult
from .report import ConversionReport
from .tree import slots

__all__ = ["replace_batchnorms"]

_GAMMA_BN_BY_RANK = {2: GammaBatchNorm1d, 3: GammaBatchNorm1d, 4: GammaBatchNorm2d}


def _input_rank(bn: nn.Module, probed: ProbeResult) -> Optional[int]:
    shapes = probed.input_shapes.get(bn)
    if shapes:
        return len(shapes[0])
    if isinstance(bn, nn.BatchNorm1d):
        return 2
    if isinstance(bn, nn.SyncBatchNorm):
        return None  # any rank: unknown unless it ran
    return 4


@torch.no_grad()
def _gamma_batchnorm(bn: nn.Module, rank: int, gamma: float) -> _GammaBatchNorm:
    """A gamma-BN computing what ``bn``'s norm part computes (same statistics, affine, eps, momentum)."""
    reference = bn.running_mean
    affine = getattr(bn, "affine", True)  # frozen BNs always apply their (fixed) weight and bias
    momentum = getattr(bn, "momentum", 0.1)  # frozen BNs become trainable ones, with torch's default momentum
    new = _GAMMA_BN_BY_RANK[rank](
        bn.num_features if hasattr(bn, "num_features") else bn.running_mean.numel(),
        gamma=gamma,
        eps=bn.eps,
        momentum=momentum,
        affine=affine,
        device=reference.device,
        dtype=reference.dtype,
    )
    new.running_mean.copy_(bn.running_mean)
    new.running_var.copy_(bn.running_var)
    if getattr(bn, "num_batches_tracked", None) is not None:
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    if affine:
        new.weight.copy_(bn.weight)
        new.bias.copy_(bn.bias)
        new.weight.requires_grad_(isinstance(bn.weight, nn.Parameter) and bn.weight.requires_grad)
        new.bias.requires_grad_(isinstance(bn.bias, nn.Parameter) and bn.bias.requires_grad)
    new.train(bn.training)
    return new


def replace_batchnorms(
    model: nn.Module, probed: ProbeResult, gamma: float, report: ConversionReport
) -> Dict[nn.Module, _GammaBatchNorm]:
    """Swap BatchNorms for gamma-BNs in place; a fused norm-act becomes ``Sequential(bn, drop, act)``.

    Returns the map from each replaced BatchNorm to its gamma-BN.
    """
    converted: Dict[nn.Module, nn.Module] = {}
    gamma_bns: Dict[nn.Module, _GammaBatchNorm] = {}
    for slot in slots(model):
        bn = slot.child
        if type(bn) not in PLAIN_BATCHNORMS + FUSED_BATCHNORM_ACTS:
            continue
        if bn not in converted:
            rank = _input_rank(bn, probed)
            if bn.running_var is None:
                report.leave(slot.name, type(bn).__name__, "batchnorm", "tracks no running statistics")
                continue
            if rank not in _GAMMA_BN_BY_RANK:
                report.leave(slot.name, type(bn).__name__, "batchnorm", f"input rank {rank} (only 1d/2d gamma-BN)")
                continue
            gamma_bns[bn] = _gamma_batchnorm(bn, rank, gamma)
            new = gamma_bns[bn]
            if type(bn) in FUSED_BATCHNORM_ACTS:  # timm applies drop then act after the norm
                new = nn.Sequential(OrderedDict(bn=new, drop=bn.drop, act=bn.act))
            converted[bn] = new
            report.replace(slot.name, type(bn).__name__, type(gamma_bns[bn]).__name__)
        slot.set(converted[bn])
    return gamma_bns
