"""Activation modules -> CenteredSoftplus."""
from typing import Dict, Tuple

import torch
from torch import nn

from ..layers.centered_softplus import CenteredSoftplus, PositiveSoftplus
from .catalog import ACTIVATIONS, SIGN_KEEPING_SLOTS
from .report import ConversionReport
from .tree import slots

__all__ = ["replace_activations"]


def replace_activations(model: nn.Module, beta: float, report: ConversionReport) -> None:
    """Swap every ReLU-family activation module for a CenteredSoftplus, in place.

    Where the output's sign matters (``SIGN_KEEPING_SLOTS``: linear-attention kernel maps) a PositiveSoftplus
    is used instead. A module instance used in several places stays shared (one beta), like the original.
    """
    converted: Dict[Tuple[nn.Module, bool], CenteredSoftplus] = {}
    device = next(model.parameters(), torch.empty(0)).device
    for slot in slots(model):
        act = slot.child
        if type(act) not in ACTIVATIONS:
            continue
        positive = (type(slot.parent), slot.attr) in SIGN_KEEPING_SLOTS
        if (act, positive) not in converted:
            new = PositiveSoftplus(beta) if positive else CenteredSoftplus(beta)
            converted[act, positive] = new.to(device)
            report.replace(slot.name, type(act).__name__,
                           "PositiveSoftplus (sign kept: kernel feature map)" if positive else "CenteredSoftplus")
        slot.set(converted[act, positive])
