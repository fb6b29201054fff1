"""Certified L2 accuracy over a data loader: the ``certified`` block of ``lcnn-timm evaluate``."""
import copy
import time
from typing import Any, Dict, Iterable, Sequence, Tuple

import torch
from torch import nn

from ..curvature.estimator import batches_on_device, model_device
from .bounds import Certificate, certify
from .radius import certified_radii
from .structure import UnsupportedStructureError

__all__ = ["CERTIFICATE_METHOD", "certified_accuracy", "certified_radii_over"]

CERTIFICATE_METHOD = (
    "global float64 bounds L_ij >= Lip(z_i - z_j), K_ij >= sup ||Hess(z_i - z_j)|| (Gram-iteration operator norms, "
    "gamma-BN, softplus beta/4, Softplus MaxMin beta/2, chain rule); per example and class j: first order m/L, "
    "curvature-based 2m/(|g| + sqrt(|g|^2 + 2Km)) (Singla & Feizi 2020), combined: the root of "
    "int_0^r min(L, |g| + K t) dt = m (never below either), min over j; accuracy counts radius > eps"
)


def certified_radii_over(model: nn.Module, loader: Iterable, inner: nn.Module, input_scale: float = 1.0,
                         progress: bool = True) -> Tuple[Certificate, Dict[str, torch.Tensor]]:
    """The certificate and every example's radii (``first_order``, ``curvature``, ``combined``) of ``loader``.

    One float64 copy of ``model`` is both certified (its copy of ``inner``) and evaluated: certifying the float32
    weights and evaluating a float64 copy, whose spectral norms divide by a sigma recomputed in float64, left the
    two 1e-7 (relative) apart, enough for points inside certified balls to change class.
    """
    memo: Dict[int, Any] = {}
    model64 = copy.deepcopy(model, memo).double()  # margins and gradients without float32 rounding
    model64.requires_grad_(False)  # a private copy: only input gradients are taken
    if id(inner) not in memo:
        raise ValueError(f"inner ({type(inner).__name__}) must be model or one of its submodules")
    certificate = certify(memo[id(inner)]).scaled_input(input_scale)
    radii: Dict[str, list] = {"first_order": [], "curvature": [], "combined": []}
    for x, y in batches_on_device(loader, None, model_device(model64), "certified", progress):
        for key, value in certified_radii(model64, x.double(), y, certificate).items():
            radii[key].append(value)
    return certificate, {key: torch.cat(values) for key, values in radii.items()}


def certified_accuracy(model: nn.Module, loader: Iterable, eps_values: Sequence[float], inner: nn.Module,
                       input_scale: float = 1.0, progress: bool = True) -> Dict[str, Any]:
    """Certified accuracy (percent) at each L2 ``eps``: first-order, curvature-based and combined radii.

    Args:
        model: the evaluated eval-mode model (inputs in [0, 1]).
        loader: ``(images, labels)`` batches.
        eps_values: L2 radii.
        inner: the LCNN inside ``model`` that :func:`certify` bounds, with ``model(x) = inner(a * x + b)``.
        input_scale: a bound on ``|a|`` per coordinate (e.g. ``1 / min(std)``).

    Returns ``{"supported": False, "reason": ...}`` when ``inner`` is outside the theory.
    """
    start = time.perf_counter()
    try:
        certificate, radius = certified_radii_over(model, loader, inner, input_scale, progress)
    except UnsupportedStructureError as error:
        return {"supported": False, "reason": str(error)}
    count = len(radius["combined"])
    off_diagonal = ~torch.eye(len(certificate.lipschitz), dtype=torch.bool)
    return {
        "supported": True, "norm": "l2", "count": count, "method": CERTIFICATE_METHOD,
        "lipschitz_bound": {"max": certificate.lipschitz[off_diagonal].max().item(),
                            "min": certificate.lipschitz[off_diagonal].min().item()},
        "hessian_bound": {"max": certificate.hessian[off_diagonal].max().item(),
                          "min": certificate.hessian[off_diagonal].min().item()},
        "median_radius": {key: value.median().item() for key, value in radius.items()},
        "levels": [dict(eps=eps, **{key: 100.0 * (value > eps).sum().item() / count for key, value in radius.items()})
                   for eps in eps_values],
        "seconds": time.perf_counter() - start,
    }
