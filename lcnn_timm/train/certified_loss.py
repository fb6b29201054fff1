"""Certified-margin training: cross-entropy on logits shifted by the pairwise Lipschitz margin.

For a model ``z = W phi(x) + b`` whose features ``phi`` are 1-Lipschitz (every layer of
:class:`lcnn_timm.models.LipschitzCnn` is), ``z_y - z_j`` is ``||w_y - w_j||``-Lipschitz, so
``z_y - z_j > margin * ||w_y - w_j||`` certifies the prediction ``y`` in the L2 ball of radius
``margin`` against class ``j``. The loss is cross-entropy on

    temperature * (z_j + margin * ||w_y - w_j||)      (the true class is not shifted)

which asks for exactly that (Lipschitz-margin training, Tsuzuku, Sato & Sugiyama, NeurIPS 2018,
with the pairwise constants of the head instead of ``sqrt 2`` times a global one). ``temperature``
sharpens the softmax: a 1-Lipschitz model's logits differ by about the input distance, ~1 here.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LipschitzMarginLoss"]


class LipschitzMarginLoss(nn.Module):
    """``CE(temperature * (z + margin * ||w_y - w_.||), y)`` with ``W`` the current weight of ``head``.

    Args:
        head: the model's final Linear (its normalised weight when spectrally normalised).
        margin: the L2 radius (input units) the loss asks to certify.
        temperature: softmax sharpness.
    """

    def __init__(self, head: nn.Module, margin: float, temperature: float = 10.0):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"certified-margin training needs a Linear classifier (model.get_classifier()), "
                             f"got {type(head).__name__}")
        for name, value in dict(margin=margin, temperature=temperature).items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.head = [head]  # a list: the loss must not register (and so save or move) the model's head twice
        self.margin, self.temperature = margin, temperature

    def pairwise_margins(self, target: torch.Tensor) -> torch.Tensor:
        """``margin * ||w_y - w_j||`` per example and class (0 for ``j = y``)."""
        weight = self.head[0].weight
        return self.margin * (weight[target][:, None, :] - weight[None, :, :]).norm(dim=-1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        shifted = logits.float() + self.pairwise_margins(target).to(torch.float32)
        return F.cross_entropy(self.temperature * shifted, target)
