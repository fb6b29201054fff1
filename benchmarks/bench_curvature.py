"""Curvature estimator throughput vs the reference's plain double-backward power iteration.

Softplus ResNet-18 (timm ``resnet18``, 3x3 stem, no max-pool, 100 classes) at
32x32, 64 images x 10 power iterations (11 HVPs), same starting vectors, eval
mode; also ``lcnn_resnet18`` when registered. ``estimate_curvature`` builds its
graph under ``lean_double_backward`` (docs/evaluation.md). Prints seconds, speed-up ratios
and the largest relative difference of the Hessian norms from the baseline's.

    python benchmarks/bench_curvature.py [--images 64] [--iterations 10] [--threads 2] [--no-jvp]
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

import lcnn_timm  # noqa: F401  (registers lcnn_* models)
from lcnn_timm.curvature import estimate_curvature


class Softplus(nn.Softplus):
    """``nn.Softplus`` usable as timm's ``act_layer`` (which passes ``inplace``)."""

    def __init__(self, inplace: bool = False):
        super().__init__(beta=10.0)


def softplus_resnet18() -> nn.Module:
    model = timm.create_model("resnet18", num_classes=100, act_layer=Softplus)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


def unit_starts(x: torch.Tensor, seed: int) -> torch.Tensor:
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def rayleigh_power_iteration(hvp, u: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` power steps plus the final Rayleigh quotient: ``iterations + 1`` HVPs."""
    for step in range(iterations + 1):
        h = hvp(u)
        lam = (u * h).flatten(1).sum(1) / (u * u).flatten(1).sum(1)
        u = h / h.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return lam.abs()


def double_backward_baseline(model, x, y, iterations, seed):
    """The reference's method: gradient with create_graph, then one autograd.grad per iteration."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=True)
    return rayleigh_power_iteration(
        lambda u: torch.autograd.grad((g * u).sum(), x, retain_graph=True)[0], unit_starts(x, seed), iterations)


def forward_over_reverse(model, x, y, iterations, seed):
    """``torch.func.jvp`` of ``torch.func.grad``: the forward is redone every iteration."""
    from torch.func import functional_call, grad, jvp

    state = {**{k: v.detach() for k, v in model.named_parameters()}, **dict(model.named_buffers())}
    g = grad(lambda z: F.cross_entropy(functional_call(model, state, (z,)), y, reduction="sum"))
    return rayleigh_power_iteration(lambda u: jvp(g, (x,), (u,))[1], unit_starts(x, seed), iterations)


def ours(tol):
    def run(model, x, y, iterations, seed):
        est = estimate_curvature(model, x, y, iterations, tol=tol, generator=torch.Generator().manual_seed(seed))
        return est.hessian_norm
    return run


def bench(name, model, x, y, iterations, methods, repeats):
    print(f"\n{name}: {x.shape[0]} images {tuple(x.shape[1:])}, {iterations} iterations, "
          f"{torch.get_num_threads()} threads, best of {repeats}", flush=True)
    times, answers = {}, {}
    for _ in range(repeats):  # interleaved, so load changes on a shared CPU hit every method alike
        for label, fn in methods.items():
            start = time.perf_counter()
            answers[label] = fn(model, x, y, iterations, seed=0).detach()
            times[label] = min(times.get(label, float("inf")), time.perf_counter() - start)
    base = "double backward (reference)"
    for label in methods:
        diff = ((answers[label] - answers[base]).abs() / answers[base]).max().item()
        print(f"  {label:<40} {times[label]:7.2f} s   x{times[base] / times[label]:.2f}   "
              f"max rel. diff of ||H|| {diff:.1e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tol", type=float, default=1e-3, help="early-stopping tolerance of the third variant")
    p.add_argument("--no-jvp", action="store_true", help="skip the forward-over-reverse variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (args.images,), generator=g)
    methods = {
        "double backward (reference)": double_backward_baseline,
        "estimate_curvature (tol=0)": ours(0.0),
        f"estimate_curvature (tol={args.tol:g})": ours(args.tol),
    }
    jvp = {} if args.no_jvp else {"forward-over-reverse (torch.func)": forward_over_reverse}
    bench("softplus resnet18", softplus_resnet18(), x, y, args.iterations, {**methods, **jvp}, args.repeats)
    if timm.is_model("lcnn_resnet18"):
        # CenteredSoftplus is a custom autograd.Function without a jvp rule: no torch.func variant
        model = timm.create_model("lcnn_resnet18", num_classes=100).eval()
        bench("lcnn_resnet18", model, x, y, args.iterations, methods, args.repeats)


if __name__ == "__main__":
    main()
