"""Per-example certified L2 radii from the local margin and gradient and the global bounds.

For ``f_j = z_y - z_j`` at ``x`` with margin ``m_j = f_j(x) > 0``, gradient ``g_j``
and certified bounds ``L_j`` (Lipschitz) and ``K_j`` (Hessian) of ``f_j``:

* first order: ``f_j(x + d) >= m_j - L_j ||d|| > 0`` for ``||d|| < m_j / L_j``;
* curvature-based (Singla & Feizi, ICML 2020): by Taylor's theorem,
  ``f_j(x + d) >= m_j - ||g_j|| r - K_j r^2 / 2 > 0`` for ``||d|| = r`` below the
  positive root ``2 m_j / (||g_j|| + sqrt(||g_j||^2 + 2 K_j m_j))``;
* combined (gradient-path bound): along ``x + t u`` the gradient norm is at most
  ``min(L_j, ||g_j|| + K_j t)``, so ``f_j(x + r u) >= m_j - A_j(r)`` with
  ``A_j(r) = int_0^r min(L_j, ||g_j|| + K_j t) dt``, and the radius is the root of
  ``A_j(r) = m_j``: at least both radii above (``min`` is at most either term), and
  strictly above the first-order one wherever ``||g_j|| < L_j`` and ``K_j`` is finite.

The example's radius is the minimum over ``j != y`` (0 when the example is
misclassified). Proofs: docs/certificates.md.
"""
from typing import Dict

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bounds import Certificate, check_eval_mode
from .executed import check_no_hooks, non_float64_dtypes
from .operator_norm import ROUNDING_MARGIN

__all__ = ["certified_radii", "check_float64", "curvature_radius", "gradient_path_radius"]

# computed gradient norms are raised by 1 + ROUNDING_MARGIN; a certified L_j is never below the true norm, so it is
# never below the computed one by more than this factor
_GRADIENT_SLACK = 1.0 + 4 * ROUNDING_MARGIN


def check_float64(model: nn.Module, images: torch.Tensor) -> None:
    """Refuse anything but float64 parameters, buffers and images (a ``ValueError`` saying how to convert)."""
    lower = non_float64_dtypes(model, images)
    if lower:
        raise ValueError(f"certified radii are computed in float64 only, got {', '.join(lower)}: pass "
                         "model.double() and images.double() (float32 margins and gradients carry rounding, e.g. at "
                         "the activations' series switch, that no proved allowance covers here)")


def curvature_radius(margin: torch.Tensor, grad_norm: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Positive root of ``margin - grad_norm r - hessian r^2 / 2`` (``margin / grad_norm`` when ``hessian = 0``).

    Written as ``2 m / (|g| + sqrt(|g|^2 + 2 K m))``: no cancellation, and 0 where ``margin <= 0``.
    """
    positive = margin > 0
    margin = torch.where(positive, margin, torch.ones_like(margin))  # no 0 / 0 where the gradient also vanishes
    root = 2 * margin / (grad_norm + (grad_norm**2 + 2 * hessian * margin).sqrt())
    return torch.where(positive, root, torch.zeros_like(root))


def gradient_path_radius(margin: torch.Tensor, grad_norm: torch.Tensor, lipschitz: torch.Tensor,
                         hessian: torch.Tensor) -> torch.Tensor:
    """Root ``r`` of ``int_0^r min(L, |g| + K t) dt = margin`` (0 where ``margin <= 0``).

    The gradient bound ``|g| + K t`` meets ``L`` at the knee ``t* = (L - |g|) / K`` (0 when ``|g| >= L``
    or ``K = inf``, infinite when ``K = 0``) after the area ``A* = t* (|g| + L) / 2`` (a trapezoid):
    below it the root is the curvature radius, above it ``t* + (margin - A*) / L``.
    """
    slack = (lipschitz - grad_norm).clamp_min(0)
    knee = torch.where(slack > 0, slack / hessian, torch.zeros_like(slack))
    knee_area = knee * (grad_norm + lipschitz) / 2
    after_knee = knee + (margin - knee_area) / lipschitz
    return torch.where(margin > knee_area, after_knee, curvature_radius(margin, grad_norm, hessian))


def _pair_radii(margins: torch.Tensor, grad_norms: torch.Tensor, lipschitz: torch.Tensor,
                hessian: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every pair's first-order, curvature-based and combined radius (elementwise)."""
    first = torch.where(margins > 0, margins / lipschitz, torch.zeros_like(margins))
    curved = curvature_radius(margins, grad_norms, hessian)
    path = torch.maximum(gradient_path_radius(margins, grad_norms, lipschitz, hessian), torch.maximum(first, curved))
    return {"first_order": first, "curvature": curved, "combined": path}


def _pair_gradient_norms(x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                         others: torch.Tensor) -> torch.Tensor:
    """``||grad (z_y - z_j)||`` of each example ``index[k]`` for its one class ``others[k]``, from ``logits =
    model(x)`` (with its graph) in one backward pass (examples are independent in eval mode), raised past float64
    rounding."""
    (gradient,) = torch.autograd.grad((logits[index, labels[index]] - logits[index, others]).sum(), x)
    return gradient[index].flatten(1).norm(dim=1) * (1.0 + ROUNDING_MARGIN)


def certified_radii(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    certificate: Certificate) -> Dict[str, torch.Tensor]:
    """Certified L2 radii of a batch around its true labels: ``first_order``, ``curvature`` and ``combined``
    (the gradient-path radius, never below the other two).

    ``model`` must be the function ``certificate`` bounds, in eval mode, in float64 (``model.double()``,
    ``images.double()``): the rounding allowance below is proved for float64 only, so lower precisions are
    refused (docs/certificates.md). A radius is 0 for a misclassified example (or a tie); the prediction is
    the same for every input at L2 distance strictly below it.

    Only the gradients that can decide the minimum over classes are computed, one class per example and backward
    pass: with ``|g_j| <= L_j`` (``L_j`` bounds the Lipschitz constant) a pair's radius lies between its value at
    ``|g_j| = L_j`` and at ``|g_j| = 0``, so a pair whose lower value is not below the example's smallest upper
    value (or exact radius found so far) cannot be the minimum. The result equals the minimum over every pair.
    """
    check_eval_mode(model)
    check_float64(model, images)
    check_no_hooks(model)  # a hook would change the margins or the gradients read below
    if labels.shape != images.shape[:1]:
        raise ValueError(f"one label per image expected: {len(images)} images, labels of shape {tuple(labels.shape)}")
    with parametrize.cached():  # the normalised weights once per call, not once per forward
        return _certified_radii(model, images, labels, certificate)


def _certified_radii(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     certificate: Certificate) -> Dict[str, torch.Tensor]:
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        graph = model(x)  # kept for the first round of gradients, which concerns nearly every example
    logits = graph.detach()
    count = len(logits)
    rows = torch.arange(count, device=logits.device)
    labels = labels.to(logits.device)
    # the computed margins and gradient norms carry the forward's and backward's rounding: lower the margins and
    # raise the gradient norms past it (relative 1e-9, float64), so a radius never exceeds the exact one of the
    # function evaluated. Rounding is relative to the terms summed, not to the result: a head bias cancelling
    # W h leaves logits far below W h's rounding, so |bias| joins |z|.
    scale = logits.abs()
    if certificate.logit_offsets is not None:
        scale = scale + certificate.logit_offsets.to(logits)
    margins = logits[rows, labels, None] - logits - ROUNDING_MARGIN * (scale[rows, labels, None] + scale)
    lipschitz = certificate.lipschitz.to(logits)[labels]
    hessian = certificate.hessian.to(logits)[labels]
    others = torch.ones_like(margins, dtype=torch.bool)
    others[rows, labels] = False
    inf = torch.full_like(margins, float("inf"))
    # |g| = L (raised past the gradients' rounding allowance): the smallest each pair's radius can be
    lower = _pair_radii(margins, lipschitz * _GRADIENT_SLACK, lipschitz, hessian)
    upper = _pair_radii(margins, torch.zeros_like(margins), lipschitz, hessian)
    known = ~others  # pairs whose gradient norm is computed (the true class needs none)
    grad_norms = torch.zeros_like(margins)
    misclassified = torch.where(others, margins, inf).amin(dim=1) <= 0  # every radius is 0: no gradient needed
    known[misclassified] = True
    while True:
        exact = _pair_radii(margins, grad_norms, lipschitz, hessian)
        needed = torch.zeros_like(known)
        for kind in ("curvature", "combined"):
            best = torch.where(known & others, exact[kind], torch.where(others, upper[kind], inf)).amin(dim=1)
            needed |= ~known & (lower[kind] < best[:, None])
        pending = needed.any(dim=1)
        if not pending.any():
            break
        # each pending example's most threatening class: the smallest lower radius among those still needed
        pick = torch.where(needed, lower["combined"], inf).argmin(dim=1)[pending]
        index = rows[pending]
        if graph is not None:
            grad_norms[index, pick] = _pair_gradient_norms(x, graph, labels, index, pick)
            graph = None
        else:  # later rounds concern a few examples: a forward of those only
            subset = images[index].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                grad_norms[index, pick] = _pair_gradient_norms(subset, model(subset), labels[index],
                                                               torch.arange(len(index), device=index.device), pick)
        known[index, pick] = True
        exceeded = grad_norms > lipschitz * _GRADIENT_SLACK
        if exceeded.any():  # the certificate is contradicted: it is not of this model (or not a bound)
            i, j = exceeded.nonzero()[0].tolist()
            raise ValueError(f"the gradient norm of z_{labels[i].item()} - z_{j} at example {i} is "
                             f"{grad_norms[i, j].item():.6g}, above the certificate's Lipschitz bound "
                             f"{lipschitz[i, j].item():.6g}: the certificate does not bound this model")
    radii = _pair_radii(margins, grad_norms, lipschitz, hessian)
    return {kind: torch.where(others, value, inf).amin(dim=1) for kind, value in radii.items()}
