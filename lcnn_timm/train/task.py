"""``LCNNTask``: timm's classification task plus the LCNN penalty, GradReg, CURE and adversarial training."""
import contextlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from timm.task import ClassificationTask
from timm.utils.model import unwrap_model
from torch import nn
from torch.nn.utils import parametrize

from ..curvature.penalty import curvature_penalty
from .certified_loss import LipschitzMarginLoss
from .regularizers import cure_penalty, frozen_state, gradreg_exact, gradreg_finite_difference, pgd_l2

__all__ = ["AdversarialConfig", "LCNNTask"]

GRADREG_MODES = ("exact", "finite_difference")


@dataclass(frozen=True)
class AdversarialConfig:
    """L2 PGD adversarial training (reference: eps 0.1, step 0.01, 3 steps, self-predicted labels)."""

    eps: float = 0.1
    step: float = 0.01
    steps: int = 3
    use_true_labels: bool = False


class LCNNTask(ClassificationTask):
    """Classification loss plus any combination of the paper's regularisers.

    ``loss = CE + beta_weight * sum(beta) + gamma_weight * sum|log gamma|
    + gradreg_weight * GradReg + cure_weight * CURE``, on adversarial inputs when
    ``adversarial`` is set. A weight of 0 switches its term off (and its cost). ``CE`` is
    ``criterion``: cross-entropy, or :class:`LipschitzMarginLoss` (certified-margin training).

    ``forward`` returns ``loss`` and ``output`` plus, for logging, the weighted
    terms ``loss_ce``, ``loss_curvature``, ``loss_gradreg``, ``loss_cure`` (they sum
    to ``loss``) and the unweighted ``beta_sum``, ``abs_log_gamma_sum``,
    ``gradreg``, ``cure`` of the enabled terms, all detached except ``loss`` and ``output``.

    Under DDP the extra forwards (finite-difference GradReg, CURE) run through the
    wrapped model and the PGD attack through the unwrapped one.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[dict] = None,
            beta_weight: float = 0.0,
            gamma_weight: float = 0.0,
            gradreg_weight: float = 0.0,
            gradreg_mode: str = "exact",
            gradreg_scale: float = 1e5,
            gradreg_fd_step: float = 1e-3,
            cure_weight: float = 0.0,
            cure_scale: float = 1e3,
            cure_step: float = 1.0,
            adversarial: Optional[AdversarialConfig] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = False,
    ):
        super().__init__(model, criterion, criterion_kwargs=criterion_kwargs, device=device, dtype=dtype, verbose=verbose)
        if gradreg_mode not in GRADREG_MODES:
            raise ValueError(f"gradreg_mode must be one of {GRADREG_MODES}, got {gradreg_mode!r}")
        for name, value in dict(beta_weight=beta_weight, gamma_weight=gamma_weight, gradreg_weight=gradreg_weight,
                                cure_weight=cure_weight).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.beta_weight, self.gamma_weight = beta_weight, gamma_weight
        self.gradreg_weight, self.gradreg_mode = gradreg_weight, gradreg_mode
        self.gradreg_scale, self.gradreg_fd_step = gradreg_scale, gradreg_fd_step
        self.cure_weight, self.cure_scale, self.cure_step = cure_weight, cure_scale, cure_step
        self.adversarial = adversarial

    def _loss_at(self, target: torch.Tensor, batchnorm_stats: bool):
        """Batch-mean loss at other inputs; spectral norms (and BN stats if asked) stay as they are."""
        model = self.trainable_module

        def loss_fn(inputs: torch.Tensor) -> torch.Tensor:
            with frozen_state(unwrap_model(model), batchnorm_stats):
                return self.criterion(model(inputs), target)

        return loss_fn

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        model = self.trainable_module
        if self.adversarial is not None:
            adv = self.adversarial
            input = pgd_l2(unwrap_model(model), input, adv.eps, adv.step, adv.steps,
                           labels=target if adv.use_true_labels else None)
        needs_input_grad = self.gradreg_weight > 0 or self.cure_weight > 0
        inputs = input.detach().requires_grad_(True) if needs_input_grad else input
        # the certified-margin loss reads the head's normalised weight: the one this forward used, not a recomputation
        reads_head = isinstance(self.criterion, LipschitzMarginLoss)
        with parametrize.cached() if reads_head else contextlib.nullcontext():
            output = model(inputs)
            ce = self.criterion(output, target)
        loss = ce
        parts: Dict[str, torch.Tensor] = {"loss_ce": ce.detach()}
        if self.beta_weight > 0 or self.gamma_weight > 0:
            penalty = curvature_penalty(unwrap_model(model), self.beta_weight, self.gamma_weight)
            loss = loss + penalty.total
            parts.update(loss_curvature=penalty.total.detach(), beta_sum=penalty.beta_sum.detach(),
                         abs_log_gamma_sum=penalty.abs_log_gamma_sum.detach())
        if self.gradreg_weight > 0:
            if self.gradreg_mode == "exact":
                gradreg = gradreg_exact(ce, inputs, self.gradreg_scale)
            else:
                gradreg = gradreg_finite_difference(ce, inputs, self._loss_at(target, True), self.gradreg_scale,
                                                    self.gradreg_fd_step)
            loss = loss + self.gradreg_weight * gradreg
            parts.update(loss_gradreg=(self.gradreg_weight * gradreg).detach(), gradreg=gradreg.detach())
        if self.cure_weight > 0:
            cure = cure_penalty(ce, inputs, self._loss_at(target, False), self.cure_scale, self.cure_step)
            loss = loss + self.cure_weight * cure
            parts.update(loss_cure=(self.cure_weight * cure).detach(), cure=cure.detach())
        return {"loss": loss, "output": output, **parts}
