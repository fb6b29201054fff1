"""One-shot device check: train-step ratios, curvature estimator, inference latency and a short training.

Meant for a CUDA machine (issue 16, item 8); ``--device cpu`` runs the same
checks at reduced sizes for a smoke test. Prints one table. Each timing is the
best of ``--reps`` interleaved runs (CUDA-synchronised). Rows:

* step ms (fp32 / bf16 autocast): relu (timm ResNet-18, CIFAR stem), standard
  (cifar_resnet18), lcnn (lcnn_resnet18), reference (``--reference PATH``), with
  ratios to relu; bf16 only where the device supports it natively
* estimate_curvature: seconds for ``--images`` examples x 10 power iterations on
  lcnn_resnet18 (eval), and the median normalized curvature it reports
* inference ms: eval forward of relu, lcnn, and lcnn frozen (``lcnn_timm.export.freeze``)
* short training: ``--train-steps`` SGD steps of lcnn_resnet18 on one fixed batch
  (memorisation: the loss must fall), first/last loss and images/s
* precision parity (``lcnn_timm.train.parity``, the check ``tests/test_precision_matrix.py`` runs on CPU):
  a 64-step ``lcnn-timm train`` run of lcnn_resnet18_025 per {fp32, bf16, fp16} x {contiguous,
  channels_last} cell; test accuracy (fp32 learns the task to 100%), the cell's re-estimated BN variances
  over fp32's re-estimation of the same weights (min-max; 1 = agree) and the saved spectral norms

Usage (about 2-4 minutes on a datacenter GPU, batch 128 at 32x32)::

    python benchmarks/gpu_check.py --device cuda [--reference /path/to/kylematoba-lcnn]
    python benchmarks/gpu_check.py --device cpu --batch-size 8 --reps 1 --train-steps 3   # smoke test

Run from the repository root with ``PYTHONPATH=.`` to check a checkout instead of the installed package.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import timm
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import (  # noqa: E402  (the benchmark next to this script)
    NUM_CLASSES,
    bf16_supported,
    reference_resnet18lcnn,
    relu_resnet18,
    run_conditions,
    step_seconds,
    train_step,
)

from lcnn_timm.curvature import estimate_curvature  # noqa: E402
from lcnn_timm.export import freeze  # noqa: E402
from lcnn_timm.train.parity import precision_parity  # noqa: E402


def _best_of(fns: Dict[str, Callable[[], object]], reps: int, device: torch.device) -> Dict[str, float]:
    """Best wall seconds of ``reps`` interleaved calls of each function, after one warm-up call each."""
    best = {name: float("inf") for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def step_rows(args, device, images, labels) -> List[Tuple[str, str]]:
    builders = {
        "relu": relu_resnet18,
        "standard": lambda: timm.create_model("cifar_resnet18", num_classes=NUM_CLASSES),
        "lcnn": lambda: timm.create_model("lcnn_resnet18", num_classes=NUM_CLASSES),
    }
    if args.reference:
        builders["reference"] = lambda: reference_resnet18lcnn(args.reference)
    rows = []
    dtypes = [("fp32", None)] + ([("bf16", torch.bfloat16)] if bf16_supported(device) else [])
    for label, amp_dtype in dtypes:
        models = {name: build().to(device).train() for name, build in builders.items()}
        seconds = step_seconds(models, images, labels, args.reps, amp_dtype)
        relu = seconds["relu"][0]
        for name, (wall, _) in seconds.items():
            rows.append((f"train step {label}: {name}", f"{wall * 1e3:.1f} ms ({wall / relu:.2f}x relu)"))
    if len(dtypes) == 1:
        rows.append(("train step bf16", f"skipped: no native bf16 on this {device.type}"))
    return rows


def estimator_rows(args, device, images, labels) -> List[Tuple[str, str]]:
    model = timm.create_model("lcnn_resnet18", num_classes=NUM_CLASSES).to(device).eval()
    x, y = images[: args.images].clamp(0, 1), labels[: args.images]
    result = {}

    def run():
        result["c"] = estimate_curvature(model, x, y, iterations=10).curvature

    seconds = _best_of({"estimate": run}, args.reps, device)["estimate"]
    return [(f"estimate_curvature lcnn, {x.shape[0]} images x 10 it.",
             f"{seconds:.2f} s, median C {result['c'].median().item():.3g}")]


def inference_rows(args, device, images) -> List[Tuple[str, str]]:
    lcnn = timm.create_model("lcnn_resnet18", num_classes=NUM_CLASSES).eval()
    models = {"relu": relu_resnet18().eval(), "lcnn": lcnn, "lcnn frozen": freeze(lcnn)}
    models = {name: model.to(device) for name, model in models.items()}

    def forward(model):
        with torch.inference_mode():
            return model(images)

    seconds = _best_of({name: (lambda m=m: forward(m)) for name, m in models.items()}, args.reps, device)
    return [(f"inference fp32: {name}", f"{s * 1e3:.1f} ms ({s / seconds['relu']:.2f}x relu)")
            for name, s in seconds.items()]


def training_rows(args, device, images, labels) -> List[Tuple[str, str]]:
    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet18", num_classes=NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    start = time.perf_counter()
    for _ in range(args.train_steps):
        train_step(model, optimizer, images, labels, None)
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(model(images), labels).item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ips = args.train_steps * images.shape[0] / (time.perf_counter() - start)
    verdict = "falls" if losses[-1] < losses[0] else "DOES NOT FALL"
    return [(f"short training: {args.train_steps} steps, fixed batch",
             f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({verdict}), {ips:.1f} img/s incl. a loss re-evaluation")]


def parity_rows(args, device) -> List[Tuple[str, str]]:
    with tempfile.TemporaryDirectory() as directory:
        rows = precision_parity(Path(directory), str(device))
    return [(f"parity {row['cell']}", f"test acc {row['test_acc']:.3f}, BN variance / fp32's "
             f"{row['bn_ratio_min']:.4f}-{row['bn_ratio_max']:.4f}, norm max {row['normalized_layer_norm_max']:.6f}, "
             f"{row['seconds']:.1f} s") for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reference", default=None, help="root of a kylematoba/lcnn checkout (optional)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--images", type=int, default=64, help="examples for the curvature estimator")
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible here (torch.cuda.is_available() is False). "
                 "Run it on a GPU machine, or pass --device cpu for a smoke test at small sizes.")
    if args.reference and not os.path.isfile(os.path.join(args.reference, "models", "model_selector.py")):
        print(f"no reference checkout at {args.reference!r}: reference row skipped")
        args.reference = None
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    print(f"{run_conditions(device)}; batch {args.batch_size}, 32x32, {NUM_CLASSES} classes, best of {args.reps}")
    rows = []
    for section in (
        lambda: step_rows(args, device, images, labels),
        lambda: estimator_rows(args, device, images, labels),
        lambda: inference_rows(args, device, images),
        lambda: training_rows(args, device, images, labels),
        lambda: parity_rows(args, device),
    ):
        rows += section()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
