"""Registration cost and accuracy of the operator spectral norm: Lanczos (now) vs 30 power-iteration steps (before).

For every normalised layer of a model, both methods start from the same random
vector; the "truth" is a long Lanczos run (300 steps, no early stop). Prints the
total time of each method (interleaved per layer, min of ``--repeats``) and the
worst relative under-estimate of the norm, which is how far above 1 the
normalised layer's norm ends up.

    python benchmarks/bench_spectral_norm.py [--model lcnn_resnet18] [--img-size 32] [--threads 2]
"""
import argparse
import time

import timm
import torch

import lcnn_timm  # noqa: F401
from bench_step import cpu_name  # the benchmark next to this script
from lcnn_timm.layers.spectral_norm import _norm_and_input, is_spectral_normalized, lanczos_top_singular_value


def power_iteration(norm, weight, start, steps):
    v = start / start.norm()
    for _ in range(steps):
        u = norm.operator.apply(v, weight)
        u = u / u.norm()
        v = norm.operator.adjoint(u, weight)
        v = v / v.norm()
    return norm.operator.apply(v, weight).norm().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lcnn_resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=100, img_size=args.img_size)
    totals = {"power30": 0.0, "lanczos": 0.0}
    worst = {"power30": 0.0, "lanczos": 0.0}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not is_spectral_normalized(module):
                continue
            norm, weight = _norm_and_input(module)
            weight = weight.detach()
            apply = lambda x: norm.operator.apply(x, weight)  # noqa: E731
            adjoint = lambda y: norm.operator.adjoint(y, weight)  # noqa: E731
            truth, _ = lanczos_top_singular_value(apply, adjoint, torch.randn_like(norm._v), max_steps=300, tol=0.0)
            start = torch.randn_like(norm._v)
            fastest = {method: float("inf") for method in totals}
            for _ in range(args.repeats):
                for method in totals:
                    began = time.perf_counter()
                    if method == "power30":
                        estimate = power_iteration(norm, weight, start, 30)
                    else:
                        estimate, _ = lanczos_top_singular_value(apply, adjoint, start)
                    fastest[method] = min(fastest[method], time.perf_counter() - began)
                    worst[method] = max(worst[method], 1 - estimate / truth)
            for method in totals:
                totals[method] += fastest[method]
    print(f"{args.model} at {args.img_size}x{args.img_size}, {args.threads} threads, {cpu_name()}")
    for method, seconds in totals.items():
        print(f"  {method:8s} total {seconds:7.2f} s   worst under-estimate {100 * worst[method]:.4f} %")
    print(f"  ratio lanczos / power30: {totals['lanczos'] / totals['power30']:.2f}x")


if __name__ == "__main__":
    main()
