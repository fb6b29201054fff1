"""Curvature estimator: throughput vs the reference's plain double-backward power iteration, and accuracy.

Speed: softplus ResNet-18 (timm ``resnet18``, 3x3 stem, no max-pool, 100 classes)
at 32x32, 64 images, eval mode, the reference's 10 power iterations (11 HVPs)
against ``estimate_curvature`` at its defaults (``DEFAULT_LANCZOS_STEPS`` = 11
Lanczos steps, 11 HVPs, graph built under ``lean_double_backward``); also ``lcnn_resnet18`` when
registered. Methods run interleaved, best of ``--repeats``. Both estimates are
lower bounds of ``||H||`` (a Rayleigh quotient and a Ritz value both lie inside
the spectrum), so the larger one is closer: printed is each method's mean and
worst ratio to a converged Lanczos run (``--converged-steps``, untimed).

Accuracy (``--accuracy``): relative error of both methods at their defaults
against exact float64 Hessians (``torch.autograd.functional.hessian``) on tiny
nets: MLP 36-16-16-10 and a conv net with GammaBatchNorm2d, centered softplus,
``--accuracy-inits`` random inits x 8 images each; ``--accuracy-steps`` adds
Lanczos at other step counts (the tail of the error distribution: how many
examples are off by more than 5 %).

    python benchmarks/bench_curvature.py [--images 64] [--threads 2] [--repeats 3] [--accuracy] [--no-jvp]
        [--accuracy-inits 20] [--accuracy-steps 11 12 13]
"""
import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

import lcnn_timm  # noqa: F401  (registers lcnn_* models)
from lcnn_timm.curvature import DEFAULT_LANCZOS_STEPS, estimate_curvature, frozen_parameters, lean_double_backward
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm2d

REFERENCE_ITERATIONS = 10  # the reference's power iterations: 11 HVPs
REFERENCE = "power iteration (reference)"


class Softplus(nn.Softplus):
    """``nn.Softplus`` usable as timm's ``act_layer`` (which passes ``inplace``)."""

    def __init__(self, inplace: bool = False):
        super().__init__(beta=10.0)


def softplus_resnet18() -> nn.Module:
    torch.manual_seed(0)  # the same random init in every run
    model = timm.create_model("resnet18", num_classes=100, act_layer=Softplus)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


def unit_starts(x: torch.Tensor, seed: int) -> torch.Tensor:
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return u / u.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def rayleigh_power_iteration(hvp, u: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` power steps plus the final Rayleigh quotient: ``iterations + 1`` HVPs."""
    for step in range(iterations + 1):
        h = hvp(u)
        lam = (u * h).flatten(1).sum(1) / (u * u).flatten(1).sum(1)
        u = h / h.flatten(1).norm(dim=1).view(-1, *([1] * (u.dim() - 1)))
    return lam.abs()


def double_backward_baseline(model, x, y, seed):
    """The reference's method: gradient with create_graph, then one autograd.grad per power iteration."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=True)
    return rayleigh_power_iteration(
        lambda u: torch.autograd.grad((g * u).sum(), x, retain_graph=True)[0], unit_starts(x, seed),
        REFERENCE_ITERATIONS)


def lean_power_iteration(model, x, y, seed):
    """The previous estimator: the reference's power iteration on the frozen, lean graph (graph vs method)."""
    with frozen_parameters(model), lean_double_backward():
        return double_backward_baseline(model, x, y, seed)


def forward_over_reverse(model, x, y, seed):
    """``torch.func.jvp`` of ``torch.func.grad`` with the reference's power iteration: the forward is redone per HVP."""
    from torch.func import functional_call, grad, jvp

    state = {**{k: v.detach() for k, v in model.named_parameters()}, **dict(model.named_buffers())}
    g = grad(lambda z: F.cross_entropy(functional_call(model, state, (z,)), y, reduction="sum"))
    return rayleigh_power_iteration(lambda u: jvp(g, (x,), (u,))[1], unit_starts(x, seed), REFERENCE_ITERATIONS)


def lanczos(steps=DEFAULT_LANCZOS_STEPS, tol=0.0):
    def run(model, x, y, seed):
        est = estimate_curvature(model, x, y, steps, tol=tol, generator=torch.Generator().manual_seed(seed))
        return est.hessian_norm
    return run


def bench(name, model, x, y, methods, repeats, converged_steps):
    print(f"\n{name}: {x.shape[0]} images {tuple(x.shape[1:])}, {torch.get_num_threads()} threads, "
          f"best of {repeats}", flush=True)
    wall, cpu, answers = {}, {}, {}
    for _ in range(repeats):  # interleaved, so load changes on a shared CPU hit every method alike
        for label, fn in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            answers[label] = fn(model, x, y, seed=0).detach()
            wall[label] = min(wall.get(label, float("inf")), time.perf_counter() - start)
            cpu[label] = min(cpu.get(label, float("inf")), time.process_time() - start_cpu)
    converged = lanczos(converged_steps)(model, x, y, seed=1)
    # on a shared CPU the process time (all threads) is the steadier measure; wall time includes waiting
    print(f"  {'method':<40} {'wall s':>7} {'speed-up':>8} {'cpu s':>7} {'speed-up':>8}   "
          f"||H|| / converged ({converged_steps} Lanczos steps): mean, worst", flush=True)
    for label in methods:
        ratio = answers[label] / converged
        print(f"  {label:<40} {wall[label]:7.2f} {wall[REFERENCE] / wall[label]:7.2f}x {cpu[label]:7.2f} "
              f"{cpu[REFERENCE] / cpu[label]:7.2f}x   {ratio.mean().item():.4f}, {ratio.min().item():.4f}", flush=True)


def issue_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(36, 16), CenteredSoftplus(), nn.Linear(16, 16), CenteredSoftplus(),
                         nn.Linear(16, 10)).double().eval(), (36,)


def gamma_bn_convnet(seed):
    torch.manual_seed(seed)
    bn = GammaBatchNorm2d(8, gamma=1.0)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), bn, CenteredSoftplus(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         CenteredSoftplus(), nn.Flatten(), nn.Linear(128, 10)).double().eval(), (1, 8, 8)


def exact_spectral_norms(model, x, y):
    norms = []
    for xi, yi in zip(x, y):
        hessian = torch.autograd.functional.hessian(
            lambda z: F.cross_entropy(model(z.unsqueeze(0)), yi.unsqueeze(0)), xi.clone())
        norms.append(torch.linalg.eigvalsh(hessian.reshape(xi.numel(), -1)).abs().max())
    return torch.stack(norms)


def accuracy(models=20, images=8, steps=(DEFAULT_LANCZOS_STEPS,)):
    """Relative error of both methods against exact float64 Hessians: median, 99th percentile, tail, worst."""
    print(f"\naccuracy vs exact float64 Hessians: {models} random inits x {images} images each "
          f"(reference {REFERENCE_ITERATIONS} power iterations = {REFERENCE_ITERATIONS + 1} HVPs, "
          f"Lanczos k steps = k HVPs; default k = {DEFAULT_LANCZOS_STEPS})", flush=True)
    methods = {REFERENCE: double_backward_baseline}
    methods.update({f"Lanczos, {k} steps": lanczos(k) for k in sorted(set(steps))})
    for make in (issue_mlp, gamma_bn_convnet):
        errors = {label: [] for label in methods}
        for seed in range(models):
            model, shape = make(seed)
            g = torch.Generator().manual_seed(seed)
            x = torch.rand(images, *shape, generator=g, dtype=torch.float64)
            y = torch.randint(0, 10, (images,), generator=g)
            truth = exact_spectral_norms(model, x, y)
            for label, fn in methods.items():
                errors[label] += ((fn(model, x, y, seed) - truth).abs() / truth).tolist()
        for label, e in errors.items():
            e = sorted(e)
            print(f"  {make.__name__:<18} {label:<30} median {statistics.median(e):.2e}  "
                  f"p99 {e[int(0.99 * (len(e) - 1))]:.2e}  > 5 %: {sum(v > 0.05 for v in e)}  worst {e[-1]:.2e}  "
                  f"(n={len(e)})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-2, help="early-stopping tolerance of the third variant")
    p.add_argument("--converged-steps", type=int, default=40, help="Lanczos steps of the (untimed) accuracy yardstick")
    p.add_argument("--accuracy", action="store_true", help="also compare both methods with exact Hessians of tiny nets")
    p.add_argument("--accuracy-inits", type=int, default=20, help="random inits per tiny net for --accuracy")
    p.add_argument("--accuracy-steps", type=int, nargs="+", default=[DEFAULT_LANCZOS_STEPS],
                   help="Lanczos step counts compared in --accuracy")
    p.add_argument("--no-jvp", action="store_true", help="skip the forward-over-reverse variant")
    p.add_argument("--no-speed", action="store_true", help="skip the ResNet-18 timings")
    p.add_argument("--no-lcnn", action="store_true", help="time the softplus ResNet-18 only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.accuracy:
        accuracy(args.accuracy_inits, steps=args.accuracy_steps)
    if args.no_speed:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (args.images,), generator=g)
    methods = {
        REFERENCE: double_backward_baseline,
        f"estimate_curvature ({DEFAULT_LANCZOS_STEPS} Lanczos steps)": lanczos(),
        f"estimate_curvature (tol={args.tol:g})": lanczos(tol=args.tol),
        "power iteration on the lean graph (previous)": lean_power_iteration,
    }
    jvp = {} if args.no_jvp else {"forward-over-reverse (torch.func)": forward_over_reverse}
    bench("softplus resnet18", softplus_resnet18(), x, y, {**methods, **jvp}, args.repeats, args.converged_steps)
    if timm.is_model("lcnn_resnet18") and not args.no_lcnn:
        # CenteredSoftplus is a custom autograd.Function without a jvp rule: no torch.func variant
        torch.manual_seed(0)
        model = timm.create_model("lcnn_resnet18", num_classes=100).eval()
        bench("lcnn_resnet18", model, x, y, methods, args.repeats, args.converged_steps)


if __name__ == "__main__":
    main()
