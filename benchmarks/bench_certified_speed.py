"""Certified radii throughput beside a plain forward + backward, measured in one run (issue 30 item 5).

Loads the shipped ``lcnn_lipcnn.fmnist`` weights, certifies the float64 copy, then times on the same Fashion-MNIST
test images and thread count:

* ``certified``: :func:`lcnn_timm.certify.evaluate.certified_radii_over` (the ``certified`` metric of ``lcnn-timm
  evaluate``): pruned per-pair gradients, float64;
* ``all pairs``: the previous method, one backward per class (10), float64 (``--all-pairs``; slow);
* ``fwd+bwd float64`` / ``float32``: one forward and one input-gradient backward of the summed logits.

Prints images/s of each and the ratios, the CPU and the thread count; ``--json`` writes them.

    python benchmarks/bench_certified_speed.py [--count 10000] [--threads 1] [--batch-size 100] [--all-pairs]
"""
import argparse
import copy
import json
import time

import timm
import torch

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.certify.evaluate import certified_radii_over
from lcnn_timm.data.fashion_mnist import load_fashion_mnist

from bench_step import cpu_name


def forward_backward_seconds(model: torch.nn.Module, batches, dtype: torch.dtype) -> float:
    start = time.perf_counter()
    for x, _ in batches:
        x = x.to(dtype).requires_grad_(True)
        torch.autograd.grad(model(x).sum(), x)
    return time.perf_counter() - start


def all_pairs_seconds(model: torch.nn.Module, batches) -> float:
    """The earlier method's cost: one backward per class for every example (the Jacobian's rows)."""
    start = time.perf_counter()
    for x, _ in batches:
        x = x.double().requires_grad_(True)
        logits = model(x)
        for c in range(logits.shape[1]):
            torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10000, help="first N Fashion-MNIST test images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--all-pairs", action="store_true", help="also time the earlier one-backward-per-class method")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = load_fashion_mnist("test")
    images, labels = images[: args.count].float().div(255).reshape(-1, 1, 28, 28), labels[: args.count]
    batches = [(images[i:i + args.batch_size], labels[i:i + args.batch_size])
               for i in range(0, len(images), args.batch_size)]
    model = timm.create_model("lcnn_lipcnn", pretrained=True).eval()
    start = time.perf_counter()
    certificate, radii = certified_radii_over(model, batches, model, progress=False)
    certified = time.perf_counter() - start
    model64 = copy.deepcopy(model).double().requires_grad_(False)
    seconds = {"certified (incl. certify)": certified,
               "fwd+bwd float64": forward_backward_seconds(model64, batches, torch.float64),
               "fwd+bwd float32": forward_backward_seconds(model.requires_grad_(False), batches, torch.float32)}
    if args.all_pairs:
        seconds["all pairs float64"] = all_pairs_seconds(model64, batches)
    report = {"cpu": cpu_name(), "threads": args.threads, "count": len(images), "batch_size": args.batch_size,
              "images_per_second": {k: len(images) / v for k, v in seconds.items()},
              "seconds": seconds,
              "certified_accuracy_at": {str(eps): (radii["combined"] > eps).double().mean().item() * 100
                                        for eps in (0.1, 0.25, 0.5, 1.0)}}
    print(f"{report['cpu']}, {args.threads} thread(s), {len(images)} images, batch {args.batch_size}")
    for key, value in seconds.items():
        print(f"  {key:28s} {len(images) / value:8.1f} images/s  ({value:.1f} s, "
              f"{value / seconds['fwd+bwd float64']:.2f}x float64 fwd+bwd)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
