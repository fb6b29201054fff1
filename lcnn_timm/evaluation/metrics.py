"""The metrics ``lcnn-timm evaluate`` can measure, each returning its results.json block.

A block holds the numbers and the protocol that produced them (count, seed,
iterations, eps, ...); see docs/evaluation.md for the schema.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..certify.evaluate import certified_accuracy
from ..curvature.estimator import (
    DEFAULT_LANCZOS_STEPS,
    batches_on_device,
    curvature_statistics,
    describe_method,
    gradient_stability_statistics,
    model_device,
    warn_if_piecewise_linear,
)
from ..robustness.autoattack import autoattack_accuracy
from ..robustness.pgd import DEFAULT_L2_EPS, pgd_sweep
from .datasets import EvalData
from .model import NormalizedModel

__all__ = ["DEFAULT_METRICS", "METRICS", "MetricOptions", "run_metric"]

CURVATURE_FUNCTION = "per-example cross-entropy at the true label, eval mode, derivatives w.r.t. [0, 1] pixels"
NOISE_DISTRIBUTION = (
    "uniform on the L2 sphere of radius `noise` around x (Gaussian direction rescaled to norm `noise`), not clipped"
)


@dataclass
class MetricOptions:
    """Protocol knobs of every metric (the CLI's options)."""

    seed: int = 0
    curvature_iterations: int = DEFAULT_LANCZOS_STEPS  # Lanczos steps = HVPs per example
    curvature_eps: float = 1e-6
    curvature_tol: float = 0.0
    pgd_norm: str = "l2"
    pgd_eps: Tuple[float, ...] = DEFAULT_L2_EPS
    pgd_steps: int = 10
    pgd_relative_step: float = 2.5
    pgd_restarts: int = 1
    noise_levels: Tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    noise_samples: int = 1
    progress: bool = True
    # filled by the curvature metric, read by later ones (the gradient-stability prediction)
    per_example_curvature: Optional[torch.Tensor] = field(default=None, repr=False)


def accuracy(model: nn.Module, data: EvalData, opts: MetricOptions) -> Dict[str, Any]:
    correct = 0
    with torch.no_grad():
        for x, y in batches_on_device(data.loader, None, model_device(model), "accuracy", opts.progress):
            correct += (model(x).argmax(dim=1) == y).sum().item()
    return {"value": 100.0 * correct / data.count, "unit": "percent top-1", "correct": correct, "count": data.count}


def curvature(model: nn.Module, data: EvalData, opts: MetricOptions) -> Dict[str, Any]:
    block: Dict[str, Any] = {
        "count": data.count, "iterations": opts.curvature_iterations, "eps": opts.curvature_eps,
        "tol": opts.curvature_tol, "seed": opts.seed, "function": CURVATURE_FUNCTION,
        "method": describe_method(opts.curvature_iterations, opts.curvature_tol),
    }
    warning = warn_if_piecewise_linear(model)
    if warning is not None:  # the numbers would look like (near-)zero curvature: report none
        return dict(block, meaningful=False, warning=warning)
    per_example, stats = curvature_statistics(
        model, data.loader, opts.curvature_iterations, opts.curvature_eps, opts.curvature_tol,
        opts.seed, progress=opts.progress,
    )
    opts.per_example_curvature = per_example["curvature"]
    iterations_used = per_example["iterations"].double()
    return dict(block, meaningful=True, warning=None, **stats,
                iterations_used={"mean": iterations_used.mean().item(), "max": int(iterations_used.max().item())})


def pgd(model: nn.Module, data: EvalData, opts: MetricOptions) -> List[Dict[str, Any]]:
    return pgd_sweep(
        model, data.loader, opts.pgd_eps, opts.pgd_norm, opts.pgd_steps, opts.pgd_relative_step,
        opts.pgd_restarts, opts.seed, progress=opts.progress,
    )


def autoattack(model: nn.Module, data: EvalData, opts: MetricOptions) -> List[Dict[str, Any]]:
    """Standard AutoAttack at the PGD sweep's norm and eps values (needs the optional pyautoattack)."""
    return [autoattack_accuracy(model, data.loader, eps, opts.pgd_norm, seed=opts.seed, progress=opts.progress)
            for eps in opts.pgd_eps]


def certified(model: nn.Module, data: EvalData, opts: MetricOptions) -> Dict[str, Any]:
    """Certified L2 accuracy at the PGD radii (docs/certificates.md), or why the model has no certificate."""
    if opts.pgd_norm != "l2":
        return {"supported": False, "reason": f"the certificates are L2 radii; the PGD norm is {opts.pgd_norm}"}
    inner, scale = (model.model, 1.0 / model.std.min().item()) if isinstance(model, NormalizedModel) else (model, 1.0)
    return certified_accuracy(model, data.loader, opts.pgd_eps, inner, scale, progress=opts.progress)


def gradient_stability(model: nn.Module, data: EvalData, opts: MetricOptions) -> Dict[str, Any]:
    levels = gradient_stability_statistics(
        model, data.loader, opts.noise_levels, opts.noise_samples, opts.seed, progress=opts.progress,
    )
    if opts.per_example_curvature is not None:
        mean_curvature = opts.per_example_curvature.double().mean().item()
        for level in levels:  # the paper's first-order prediction ||d|| * E C_f
            level["predicted"] = level["noise"] * mean_curvature
    return {
        "count": data.count, "samples": opts.noise_samples, "seed": opts.seed, "noise_distribution": NOISE_DISTRIBUTION,
        "quantity": "||grad f(x + d) - grad f(x)||_2 / ||grad f(x)||_2, f as in curvature",
        "levels": levels,
    }


# name -> runner; dict order is the order metrics run in (curvature before gradient_stability)
METRICS: Dict[str, Callable[[nn.Module, EvalData, MetricOptions], Any]] = {
    "accuracy": accuracy,
    "curvature": curvature,
    "pgd": pgd,
    "certified": certified,
    "autoattack": autoattack,
    "gradient_stability": gradient_stability,
}
DEFAULT_METRICS = ("accuracy", "curvature", "pgd", "certified", "gradient_stability")  # AutoAttack is slow and optional


def run_metric(name: str, model: nn.Module, data: EvalData, opts: MetricOptions) -> Any:
    """Measure one metric by name; unknown names are a ValueError listing the valid ones."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    return METRICS[name](model, data, opts)
