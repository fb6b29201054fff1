"""The reference LCNN residual block ("halves" block).

``x + F(x)`` has Lipschitz constant ``1 + Lip(F)``, which compounds over depth.
The reference ResNets instead duplicate the input into two halves scaled by
``1/sqrt(2)`` (an isometry), map one half with the residual branch and the
other with the shortcut, and average them:

    block(x) = act( (F(x / sqrt 2) + S(x / sqrt 2)) / 2 )

so ``Lip(block) <= Lip(act) * max(Lip F, Lip S) / sqrt(2)`` and every step is a
layer of the chain in the paper's Theorem 1. The duplicated tensor is never
materialised: the two halves are computed from the same scaled input.
"""
import math
from typing import Optional

import torch
from torch import nn

__all__ = ["FoldedHalvesResidual", "HalvesResidual"]


class HalvesResidual(nn.Module):
    """``act((residual(x / sqrt 2) + shortcut(x / sqrt 2)) / 2)``; ``shortcut=None`` is the identity."""

    __constants__ = ["input_scale", "output_scale"]  # class attributes TorchScript can read
    input_scale = 1.0 / math.sqrt(2.0)
    output_scale = 0.5

    def __init__(self, residual: nn.Module, shortcut: Optional[nn.Module] = None, act: Optional[nn.Module] = None):
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale
        # scaling the fresh sum in place saves an activation-sized buffer (and its page faults on CPU)
        return self.act(torch.add(self.residual(x), self.shortcut(x)).mul_(self.output_scale))


class FoldedHalvesResidual(nn.Module):
    """Inference form of :class:`HalvesResidual`: ``act(residual(x) + shortcut_scale * shortcut(x))``.

    The block's ``1/sqrt 2`` and ``1/2`` scalings have been moved into the branches'
    convolutions (or, for an identity shortcut, into ``shortcut_scale``), which saves
    two passes over the activation per block. Built by :func:`lcnn_timm.export.freeze`.
    """

    def __init__(self, residual: nn.Module, shortcut: nn.Module, act: nn.Module, shortcut_scale: float = 1.0):
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut
        self.act = act
        self.shortcut_scale = shortcut_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.add(self.residual(x), self.shortcut(x), alpha=self.shortcut_scale))

    def extra_repr(self) -> str:
        return f"shortcut_scale={self.shortcut_scale:.6g}"
