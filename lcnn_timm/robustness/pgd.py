"""Projected gradient descent (Madry et al.) for evaluation: L2 and Linf, inputs kept in [0, 1].

Every iterate is checked: an example counts as broken as soon as any iterate of
any restart is misclassified, and that iterate is returned for it. Each eps is
attacked independently (a sweep does not reuse smaller-eps examples).
"""
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..curvature.estimator import batches_on_device, frozen_parameters, model_device

__all__ = ["NORMS", "DEFAULT_L2_EPS", "adversarial_accuracy", "pgd_attack", "pgd_sweep"]

NORMS = ("l2", "linf")
DEFAULT_L2_EPS = (0.05, 0.1, 0.15, 0.2)  # the paper's adversarial table
DEFAULT_STEPS = 10
DEFAULT_RELATIVE_STEP = 2.5  # step size = 2.5 * eps / steps (Madry et al.)


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1))).clamp_min(1e-12)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Uniform in the Linf box, or uniform in the L2 ball (Gaussian direction, radius eps * U^(1/d))."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (noise * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    radius = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype).to(x.device) ** (1.0 / x[0].numel())
    return direction / _norm(direction) * eps * radius.view(-1, *([1] * (x.dim() - 1)))


def _step_and_project(delta: torch.Tensor, grad: torch.Tensor, eps: float, step_size: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return (delta + step_size * grad.sign()).clamp(-eps, eps)
    delta = delta + step_size * grad / _norm(grad)
    return delta * (eps / _norm(delta)).clamp(max=1.0)


def _check(eps: float, norm: str, steps: int, restarts: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown PGD norm {norm!r}; choose one of {NORMS}")
    if eps < 0 or steps < 0 or restarts < 1:
        raise ValueError(f"PGD needs eps >= 0, steps >= 0 and restarts >= 1, got eps={eps}, steps={steps}, restarts={restarts}")


def pgd_attack(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        norm: str = "l2",
        steps: int = DEFAULT_STEPS,
        step_size: Optional[float] = None,
        restarts: int = 1,
        random_start: bool = True,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Adversarial examples in ``[0, 1]`` within ``||x_adv - x|| <= eps`` (``norm`` 'l2' or 'linf').

    ``step_size`` defaults to ``2.5 * eps / steps``. Each restart starts at a random
    point of the ball when ``random_start``; examples already broken are kept.
    The model must be in eval mode.
    """
    _check(eps, norm, steps, restarts)
    if model.training:
        raise ValueError("PGD evaluation runs with the model in eval mode (call model.eval())")
    step_size = DEFAULT_RELATIVE_STEP * eps / max(steps, 1) if step_size is None else step_size
    x, best = x.detach(), x.detach().clone()
    broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with frozen_parameters(model):
        for _ in range(restarts):
            delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
            for step in range(steps + 1):
                adv = (x + delta).clamp(0, 1).requires_grad_(step < steps)
                with torch.set_grad_enabled(step < steps):
                    logits = model(adv)
                wrong = (logits.argmax(dim=1) != y) & ~broken
                best[wrong] = adv.detach()[wrong]
                broken |= wrong
                if step == steps or broken.all():
                    break
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), adv)
                delta = _step_and_project(adv.detach() - x, grad, eps, step_size, norm)
            if broken.all():
                break
    return best


def adversarial_accuracy(
        model: nn.Module,
        loader: Iterable,
        eps: float,
        norm: str = "l2",
        steps: int = DEFAULT_STEPS,
        step_size: Optional[float] = None,
        restarts: int = 1,
        random_start: bool = True,
        seed: int = 0,
        max_examples: Optional[int] = None,
        progress: bool = True,
) -> Dict[str, float]:
    """Top-1 accuracy (percent) under :func:`pgd_attack`, with the protocol that produced it."""
    _check(eps, norm, steps, restarts)
    step_size = DEFAULT_RELATIVE_STEP * eps / max(steps, 1) if step_size is None else step_size
    generator = torch.Generator().manual_seed(seed)
    correct = count = 0
    desc = f"PGD {norm} eps={eps:g}"
    for x, y in batches_on_device(loader, max_examples, model_device(model), desc, progress):
        adv = pgd_attack(model, x, y, eps, norm, steps, step_size, restarts, random_start, generator)
        with torch.no_grad():
            correct += (model(adv).argmax(dim=1) == y).sum().item()
        count += x.shape[0]
    if count == 0:
        raise ValueError("adversarial_accuracy: the loader yielded no examples")
    return {
        "norm": norm, "eps": float(eps), "steps": steps, "step_size": float(step_size), "restarts": restarts,
        "random_start": random_start, "seed": seed, "accuracy": 100.0 * correct / count, "count": count,
    }


def pgd_sweep(
        model: nn.Module,
        loader: Iterable,
        eps_values: Sequence[float] = DEFAULT_L2_EPS,
        norm: str = "l2",
        steps: int = DEFAULT_STEPS,
        relative_step: float = DEFAULT_RELATIVE_STEP,
        restarts: int = 1,
        seed: int = 0,
        max_examples: Optional[int] = None,
        progress: bool = True,
) -> List[Dict[str, float]]:
    """:func:`adversarial_accuracy` for each eps, step size ``relative_step * eps / steps``."""
    return [
        adversarial_accuracy(
            model, loader, eps, norm, steps, relative_step * eps / max(steps, 1), restarts,
            seed=seed, max_examples=max_examples, progress=progress,
        )
        for eps in eps_values
    ]
