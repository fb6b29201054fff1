"""Input-gradient regularisers and adversarial examples of the paper's baselines (spec section 4).

Every function takes the model in training mode and the inputs in [0, 1]
pixel scale, and returns an unweighted penalty whose gradient reaches the
parameters (the caller multiplies by its weight).

* :func:`gradreg_exact` -- ``scale * sum(G ** 2) / B`` with ``G = dL/dx`` of the
  batch-mean loss, by double backprop (``create_graph=True``).
* :func:`gradreg_finite_difference` -- the same value, with a parameter gradient
  from a finite difference of loss gradients along ``G`` (no double backprop).
* :func:`cure_penalty` -- CURE / HessianReg: ``scale * ||G(x + d) - G(x)||^2 / B``
  with ``d`` the per-example unit-L2 sign direction of ``G``.
* :func:`pgd_l2` -- L2 PGD adversarial examples for adversarial training.
"""
import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.spectral_norm import OperatorSpectralNorm

__all__ = ["cure_penalty", "frozen_state", "gradreg_exact", "gradreg_finite_difference", "pgd_l2"]

LossFn = Callable[[torch.Tensor], torch.Tensor]  # inputs -> batch-mean loss


@contextlib.contextmanager
def frozen_state(model: nn.Module, batchnorm_stats: bool = True) -> Iterator[None]:
    """Extra forwards of a step that must not change buffers.

    Spectral norms skip their power iteration: it updates ``u, v`` in place, which
    the first forward's graph still needs. With ``batchnorm_stats``, BatchNorm
    layers (gamma-BN included) keep their running statistics (momentum 0).
    """
    norms = [m for m in model.modules() if isinstance(m, OperatorSpectralNorm)]
    bns = [m for m in model.modules() if batchnorm_stats and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.n_power_iterations for m in norms], [m.momentum for m in bns]
    try:
        for m in norms:
            m.n_power_iterations = 0
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, value in zip(norms, saved[0]):
            m.n_power_iterations = value
        for m, value in zip(bns, saved[1]):
            m.momentum = value


def _squared_sum(t: torch.Tensor) -> torch.Tensor:
    """``sum(t ** 2)`` accumulated in at least float32 (input gradients may be bf16 under autocast)."""
    return t.pow(2).sum(dtype=torch.promote_types(t.dtype, torch.float32))


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def gradreg_exact(loss: torch.Tensor, inputs: torch.Tensor, scale: float = 1e5) -> torch.Tensor:
    """``scale * sum((dloss/dinputs) ** 2) / B``, differentiable by double backprop.

    ``loss`` is the batch-mean loss computed from ``inputs`` (which requires grad).
    The reference scaling makes it ``scale / B^2 * mean_i ||grad_x loss_i||^2``.
    """
    (grad,) = torch.autograd.grad(loss, inputs, create_graph=True)
    return _squared_sum(grad) * (scale / inputs.shape[0])


def gradreg_finite_difference(
        loss: torch.Tensor,
        inputs: torch.Tensor,
        loss_fn: LossFn,
        scale: float = 1e5,
        step: float = 1e-3,
) -> torch.Tensor:
    """GradReg with the same value as :func:`gradreg_exact` and a finite-difference parameter gradient.

    For ``g = dL/dx`` (detached), ``d/dtheta ||grad_x L||^2 = 2 H_{theta x} g``, and
    ``L(x + h g) - L(x) = h g . grad_x L + O(h^2)``, so the surrogate
    ``2 (L(x + h g) - L(x)) / h`` has the required parameter gradient up to
    ``O(h)``. ``h`` moves the examples by ``step`` (RMS L2 per example). Cost: one
    input-gradient backward and one forward more than the plain step, against a
    double backward. ``loss_fn`` recomputes the batch-mean loss at shifted inputs
    (run it under :func:`frozen_state`). The returned tensor's value is the exact
    penalty; only its gradient is approximate.
    """
    (grad,) = torch.autograd.grad(loss, inputs, retain_graph=True)
    grad = grad.detach()
    batch = inputs.shape[0]
    squared = _squared_sum(grad)
    value = squared * (scale / batch)
    if squared == 0:
        return value
    h = step * batch ** 0.5 / squared.sqrt()
    surrogate = (loss_fn(inputs.detach() + h * grad) - loss) * (2.0 / h)
    return value + (surrogate - surrogate.detach()) * (scale / batch)


def cure_penalty(
        loss: torch.Tensor,
        inputs: torch.Tensor,
        loss_fn: LossFn,
        scale: float = 1e3,
        step: float = 1.0,
) -> torch.Tensor:
    """CURE: ``scale * ||G(x + d) - G(x)||_F^2 / B`` with ``d_i = step * sign(G_i) / ||sign(G_i)||_2``.

    ``G`` is the input gradient of the batch-mean loss; both gradients keep their
    graphs and ``d`` is detached (reference: step 1 in [0, 1] pixel units, scale 1e3).
    """
    (grad,) = torch.autograd.grad(loss, inputs, create_graph=True)
    direction = grad.detach().sign()
    direction = direction / _per_example_norm(direction).clamp_min(1e-12) * step
    shifted = (inputs.detach() + direction).requires_grad_(True)
    (grad_shifted,) = torch.autograd.grad(loss_fn(shifted), shifted, create_graph=True)
    return _squared_sum(grad_shifted - grad) * (scale / inputs.shape[0])


def pgd_l2(
        model: nn.Module,
        inputs: torch.Tensor,
        eps: float = 0.1,
        step: float = 0.01,
        steps: int = 3,
        labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """L2 PGD: ``steps`` normalised-gradient ascent steps on CE, projected to the ``eps``-ball around ``inputs``.

    Reference choices: random start uniform in ``[-eps, eps]^d`` projected to the
    ball, labels = the model's own predictions when ``labels`` is None, no clipping
    to [0, 1], and the model in whatever mode it is in (training mode: batch
    statistics). Returns detached adversarial inputs.
    """
    inputs = inputs.detach()
    if labels is None:
        with torch.no_grad():
            labels = model(inputs).argmax(dim=1)

    def project(delta: torch.Tensor) -> torch.Tensor:
        return delta * (eps / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)

    noise = torch.rand(inputs.shape, device=inputs.device, generator=generator, dtype=inputs.dtype)
    delta = project((noise * 2 - 1) * eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(inputs + delta), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() + step * grad / _per_example_norm(grad).clamp_min(1e-12))
    return (inputs + delta).detach()
