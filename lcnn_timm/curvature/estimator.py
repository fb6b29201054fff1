"""Per-example normalized curvature ``C_f(x) = ||H_x||_2 / (||g_x||_2 + eps)``, measured.

``f`` is the example's cross-entropy at its true label, differentiated with
respect to the model's input (the evaluation wrapper takes [0,1] pixels), with
the model in eval mode so that the examples of a batch cannot influence each
other and summing the per-example losses gives every example its own gradient
and Hessian-vector products.

The Hessian spectral norm is ``|theta|`` of the largest-magnitude Ritz value of
a Lanczos run per example (each example its own Krylov space, fully
reorthogonalised; the small tridiagonal matrices are diagonalised in float64).
Input Hessians are indefinite: power iteration with a Rayleigh quotient, the
reference's method, cancels when the two largest-magnitude eigenvalues have
opposite signs (errors up to 87% at 10 iterations), while Lanczos finds both
ends of the spectrum and converges much faster for the same number of HVPs.
Ritz values lie inside the spectrum, so the estimate never exceeds ``||H_x||``.

HVPs use double backward (build ``g = d sum(f) / dx`` once with a graph, then
one backward per step): on CPU that beats forward-over-reverse
(``torch.func.jvp`` of the gradient), which redoes the forward every step.
Parameter gradients are switched off while measuring and the graph is built
under :func:`~lcnn_timm.curvature.double_backward.lean_double_backward`, which
drops the convolutions and batch-norm terms that PyTorch's double backward
computes for frozen weights anyway (docs/evaluation.md). An example stops
early when its Krylov space becomes invariant (zero or low-rank Hessian) or,
with ``tol``, when its extreme Ritz pair has converged; the graph is rebuilt on
the unfinished examples once at least half of them have stopped.
"""
import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .double_backward import lean_double_backward

__all__ = [
    "batches_on_device",
    "model_device",
    "CurvatureEstimate",
    "CurvatureNotMeaningfulWarning",
    "DEFAULT_LANCZOS_STEPS",
    "PIECEWISE_LINEAR_ACTIVATIONS",
    "curvature_statistics",
    "describe_method",
    "estimate_curvature",
    "frozen_parameters",
    "gradient_stability",
    "gradient_stability_statistics",
    "input_gradient",
    "piecewise_linear_modules",
    "summarize",
    "warn_if_piecewise_linear",
]

# Activations whose second derivative is zero almost everywhere: the measured
# Hessian then only holds the softmax's curvature, not the network's.
PIECEWISE_LINEAR_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Threshold,
)

DEFAULT_PERCENTILES = (5, 25, 75, 95)
DEFAULT_LANCZOS_STEPS = 11


class CurvatureNotMeaningfulWarning(UserWarning):
    """The model has piecewise-linear activations, so its input curvature is not meaningful."""


@dataclass
class CurvatureEstimate:
    """Per-example results, each a 1-D tensor over the batch.

    ``eigenvalue`` is the signed extreme (largest-magnitude) Ritz value,
    ``hessian_norm`` its absolute value, ``iterations`` the Lanczos steps (=
    Hessian-vector products) each example used.
    """

    gradient_norm: torch.Tensor
    hessian_norm: torch.Tensor
    eigenvalue: torch.Tensor
    curvature: torch.Tensor
    iterations: torch.Tensor


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Switch off ``requires_grad`` on every parameter for the block, then restore it.

    Input derivatives do not need parameter gradients; keeping them on makes
    autograd record (and in double backward, run) the weight-gradient branches.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError(
            "curvature and attacks must run with the model in eval mode (call model.eval()): "
            "in training mode BatchNorm mixes the examples of a batch"
        )


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def input_gradient(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``d CE(model(x_i), y_i) / d x_i`` for a batch; returns ``(gradient, x)``.

    The returned ``x`` is the leaf the gradient was taken with respect to (needed
    to differentiate the gradient again when ``create_graph`` is True).
    """
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad, x


def piecewise_linear_modules(model: nn.Module) -> List[str]:
    """Names of the model's piecewise-linear (ReLU-family) activation modules."""
    return [name for name, m in model.named_modules() if isinstance(m, PIECEWISE_LINEAR_ACTIVATIONS)]


def warn_if_piecewise_linear(model: nn.Module) -> Optional[str]:
    """Warn (and return the message) if the model's curvature is not meaningful."""
    names = piecewise_linear_modules(model)
    if not names:
        return None
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    message = (
        f"curvature is not meaningful for this model: it has piecewise-linear activations ({shown}), "
        "whose second derivative is zero almost everywhere, so the measured Hessian misses the "
        "network's own curvature. Use a smooth activation (e.g. CenteredSoftplus) to measure it."
    )
    warnings.warn(message, CurvatureNotMeaningfulWarning, stacklevel=3)
    return message


def _extreme_ritz_values(alpha: torch.Tensor, beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Signed largest-magnitude eigenvalue of each Lanczos tridiagonal, and its eigenvector's last entry.

    ``alpha`` (batch, k) is the diagonal, ``beta`` (batch, k) the couplings
    (``beta[:, i]`` joins steps ``i`` and ``i + 1``; the last column is unused).
    Rows that stopped early are zero-padded: the padding only adds zero
    eigenvalues, which never beat a nonzero one in magnitude.
    """
    off = beta[:, :-1]
    tridiagonal = torch.diag_embed(alpha) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    pick = values.abs().argmax(dim=1, keepdim=True)
    last_entry = vectors[:, -1, :].gather(1, pick).squeeze(1)
    return values.gather(1, pick).squeeze(1), last_entry


def estimate_curvature(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        iterations: int = DEFAULT_LANCZOS_STEPS,
        eps: float = 1e-6,
        tol: float = 0.0,
        generator: Optional[torch.Generator] = None,
) -> CurvatureEstimate:
    """Estimate gradient norm, Hessian spectral norm and normalized curvature per example.

    ``||H_x||`` is the largest-magnitude Ritz value of ``iterations`` Lanczos
    steps per example (one Hessian-vector product each), see the module docstring.

    Args:
        model: eval-mode model mapping ``x`` to logits.
        x: input batch (for the evaluation wrapper, [0,1] pixels).
        y: integer labels.
        iterations: Lanczos steps = Hessian-vector products per example (the
            reference's 10 power iterations used 11).
        eps: added to the gradient norm in the denominator of ``C``.
        tol: an example stops once the residual bound ``||H z - theta z||`` of its
            extreme Ritz pair ``(theta, z)`` is at most ``tol * |theta|``; 0 runs
            every example for all steps (unless its Krylov space became invariant).
        generator: random source for the starting vectors.
    """
    _check_eval(model)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    batch, shape = x.shape[0], x.shape[1:]
    q = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device).flatten(1)
    q = q / q.norm(dim=1, keepdim=True)
    basis = x.new_zeros(iterations, batch, q.shape[1])  # the Lanczos vectors of every example
    alpha = torch.zeros(batch, iterations, dtype=torch.float64, device=x.device)
    beta = torch.zeros_like(alpha)
    scale = torch.zeros(batch, dtype=torch.float64, device=x.device)  # running max of |alpha|, beta ~ ||T||
    steps = torch.full((batch,), iterations, dtype=torch.long, device=x.device)
    active = torch.arange(batch, device=x.device)  # examples still iterating
    # a coupling this small (relative to ||T||) means the Krylov space is invariant, so its Ritz values are
    # exact eigenvalues; it is reached at once for a zero Hessian and after rank(H) steps for a low-rank one
    breakdown = torch.finfo(x.dtype).eps ** 0.5
    with frozen_parameters(model), lean_double_backward():
        grad, leaf = input_gradient(model, x, y, create_graph=True)
        gradient_norm = _per_example_norm(grad.detach())
        rows = active.clone()  # positions of the active examples inside the current graph
        for step in range(iterations):
            basis[step, active] = q
            v = q.view(-1, *shape)
            if rows.numel() < leaf.shape[0]:
                v = torch.zeros_like(leaf).index_copy_(0, rows, v)
            (h,) = torch.autograd.grad((grad * v).sum(), leaf, retain_graph=True)
            w = h[rows].flatten(1) if rows.numel() < leaf.shape[0] else h.flatten(1)
            a = (q * w).sum(dim=1)
            alpha[active, step] = a.double()
            if step == iterations - 1:
                break
            # full reorthogonalisation against every earlier vector, twice ("twice is enough")
            previous = basis[: step + 1, active]
            for _ in range(2):
                w = w - torch.einsum("kbn,kb->bn", previous, torch.einsum("kbn,bn->kb", previous, w))
            b = w.norm(dim=1)
            scale[active] = torch.maximum(scale[active], torch.maximum(a.abs(), b).double())
            done = b.double() <= breakdown * scale[active]
            if tol > 0:
                theta, last = _extreme_ritz_values(alpha[active, : step + 1], beta[active, : step + 1])
                done |= b.double() * last.abs() <= tol * theta.abs()
            beta[active, step] = torch.where(done, torch.zeros_like(b), b).double()
            q = w / b.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(1)
            if done.any():
                steps[active[done]] = step + 1
                keep = ~done
                active, rows, q = active[keep], rows[keep], q[keep]
                if active.numel() == 0:
                    break
                if 2 * active.numel() <= leaf.shape[0]:
                    # most of the graph is now dead weight: rebuild it on the active examples
                    grad, leaf = input_gradient(model, x[active], y[active], create_graph=True)
                    rows = torch.arange(active.numel(), device=x.device)
    eigenvalue, _ = _extreme_ritz_values(alpha, beta)
    eigenvalue = eigenvalue.to(x.dtype)
    hessian_norm = eigenvalue.abs()
    return CurvatureEstimate(
        gradient_norm=gradient_norm,
        hessian_norm=hessian_norm,
        eigenvalue=eigenvalue,
        curvature=hessian_norm / (gradient_norm + eps),
        iterations=steps,
    )


def describe_method(iterations: int = DEFAULT_LANCZOS_STEPS, tol: float = 0.0) -> Dict[str, Any]:
    """How :func:`estimate_curvature` measured ``||H_x||`` with these settings, for results files."""
    return {
        "name": "lanczos",
        "hessian_vector_products": "double backward, graph built once per batch",
        "steps": iterations,
        "max_hvps_per_example": iterations,
        "start": "Gaussian, unit norm per example, seeded",
        "reorthogonalization": "full (classical Gram-Schmidt, twice per step)",
        "estimate": "largest-magnitude Ritz value of the tridiagonal (eigh in float64); never exceeds ||H||",
        "stop": "Krylov space invariant (coupling <= sqrt(machine eps) * ||T||)"
                + (f", or Ritz residual <= {tol:g} * |theta|" if tol > 0 else ""),
    }


def gradient_stability(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        noise_levels: Sequence[float] = (1e-3, 1e-2, 1e-1),
        samples: int = 1,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Relative input-gradient change ``||g(x + d) - g(x)|| / ||g(x)||`` under random noise.

    ``d`` is drawn uniformly from the L2 sphere of radius ``noise`` (a Gaussian
    direction rescaled to norm exactly ``noise``), so the paper's first-order
    prediction is ``noise * C_f(x)``. ``x + d`` is not clipped to [0,1] (clipping
    would change ``||d||``). Returns a ``(len(noise_levels), batch)`` tensor, each
    entry the mean over ``samples`` draws.
    """
    _check_eval(model)
    with frozen_parameters(model):
        clean, _ = input_gradient(model, x, y)
        clean_norm = _per_example_norm(clean).clamp_min(torch.finfo(x.dtype).tiny)
        out = torch.zeros(len(noise_levels), x.shape[0], dtype=x.dtype, device=x.device)
        for i, noise in enumerate(noise_levels):
            for _ in range(samples):
                d = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
                d = d * _expand(noise / _per_example_norm(d), d)
                noisy, _ = input_gradient(model, x + d, y)
                out[i] += _per_example_norm(noisy - clean) / clean_norm
    return out / samples


def summarize(values: torch.Tensor, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Dict[str, float]:
    """Mean, std (unbiased), median, min, max and percentiles of a 1-D tensor, as floats."""
    v = values.detach().double().flatten().cpu()
    if v.numel() == 0:
        raise ValueError("cannot summarize an empty set of values")
    stats = {
        "mean": v.mean().item(),
        "std": v.std().item() if v.numel() > 1 else 0.0,
        "median": v.median().item(),
        "min": v.min().item(),
        "max": v.max().item(),
    }
    for p in percentiles:
        stats[f"p{p:g}"] = torch.quantile(v, p / 100).item()
    return stats


def batches_on_device(
        loader: Iterable, max_examples: Optional[int], device: torch.device, desc: str, progress: bool = True,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of ``loader`` moved to ``device``, cut at ``max_examples``, with a tqdm bar."""
    total = max_examples if max_examples is not None else _length(loader)
    seen = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for x, y in loader:
            if max_examples is not None:
                if seen >= max_examples:
                    break
                x, y = x[: max_examples - seen], y[: max_examples - seen]
            seen += x.shape[0]
            yield x.to(device), y.to(device)
            bar.update(x.shape[0])


def _length(loader: Iterable) -> Optional[int]:
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else None


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def curvature_statistics(
        model: nn.Module,
        loader: Iterable,
        iterations: int = DEFAULT_LANCZOS_STEPS,
        eps: float = 1e-6,
        tol: float = 0.0,
        seed: int = 0,
        max_examples: Optional[int] = None,
        progress: bool = True,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, float]]]:
    """Curvature over a dataset: ``(per_example, statistics)``.

    ``per_example`` maps ``gradient_norm``, ``hessian_norm``, ``curvature`` and
    ``iterations`` to 1-D tensors over the examples; ``statistics`` maps the first
    three to :func:`summarize` dicts. ``loader`` yields ``(x, y)`` batches; at most
    ``max_examples`` are used. Warns (:class:`CurvatureNotMeaningfulWarning`) for
    piecewise-linear models.
    """
    warn_if_piecewise_linear(model)
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    parts: Dict[str, List[torch.Tensor]] = {"gradient_norm": [], "hessian_norm": [], "curvature": [], "iterations": []}
    for x, y in batches_on_device(loader, max_examples, device, "curvature", progress):
        est = estimate_curvature(model, x, y, iterations=iterations, eps=eps, tol=tol, generator=generator)
        for key, values in parts.items():
            values.append(getattr(est, key).detach().cpu())
    if not parts["curvature"]:
        raise ValueError("curvature_statistics: the loader yielded no examples")
    per_example = {key: torch.cat(values) for key, values in parts.items()}
    stats = {key: summarize(per_example[key]) for key in ("gradient_norm", "hessian_norm", "curvature")}
    return per_example, stats


def gradient_stability_statistics(
        model: nn.Module,
        loader: Iterable,
        noise_levels: Sequence[float] = (1e-3, 1e-2, 1e-1),
        samples: int = 1,
        seed: int = 0,
        max_examples: Optional[int] = None,
        progress: bool = True,
) -> List[Dict[str, float]]:
    """:func:`gradient_stability` over a dataset: one :func:`summarize` dict per noise level."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    parts = []
    for x, y in batches_on_device(loader, max_examples, device, "gradient stability", progress):
        parts.append(gradient_stability(model, x, y, noise_levels, samples, generator).cpu())
    if not parts:
        raise ValueError("gradient_stability_statistics: the loader yielded no examples")
    values = torch.cat(parts, dim=1)
    return [dict(noise=float(n), **summarize(values[i])) for i, n in enumerate(noise_levels)]
