"""Activation modules -> CenteredSoftplus."""
from typing import Dict

import torch
from torch import nn

from ..layers.centered_softplus import CenteredSoftplus
from .catalog import ACTIVATIONS
from .report import ConversionReport
from .tree import slots

__all__ = ["replace_activations"]


def replace_activations(model: nn.Module, beta: float, report: ConversionReport) -> None:
    """Swap every ReLU-family activation module for a CenteredSoftplus, in place.

    A module instance used in several places stays shared (one beta), like the original.
    """
    converted: Dict[nn.Module, CenteredSoftplus] = {}
    device = next(model.parameters(), torch.empty(0)).device
    for slot in slots(model):
        act = slot.child
        if type(act) not in ACTIVATIONS:
            continue
        if act not in converted:
            converted[act] = CenteredSoftplus(beta).to(device)
            report.replace(slot.name, type(act).__name__, "CenteredSoftplus")
        slot.set(converted[act])
