"""Eval-mode inference latency of lcnn_resnet18 vs the same halves ResNet-18 with ReLU.

Batch 64, 32x32, CPU, fp32 and bf16 autocast + channels_last. Variants, timed
round-robin (so that load from other processes hits them alike), best of
``--repeats``:

* relu:          cifar_resnet18 with ReLU (plain non-affine BN, plain convs): the reference point
* standard:      cifar_resnet18, the paper's baseline (softplus beta=1000)
* lcnn_relu:     lcnn_resnet18 layers (spectral norms, gamma-BN) with ReLU
* lcnn:          lcnn_resnet18 (centered softplus)
* lcnn_frozen:   lcnn_timm.export.freeze(lcnn_resnet18): norms baked, gamma-BN -> plain BN folded into the convs
* lcnn_fused:    freeze(lcnn_resnet18, compiled_activations=True): also one compiled pass per activation
* relu_frozen:   freeze(relu): the reference point with its BatchNorms and halves scalings folded too (like-for-like)

With ``--compile``, ``torch.compile`` (inductor) copies of relu, lcnn and lcnn_frozen
are timed too, so compiled LCNN can be compared with compiled ReLU.

Target (issue 3): lcnn within 1.15x of relu. Each row prints its ratio to relu and
to relu_frozen.

    python benchmarks/bench_inference.py [--repeats 5] [--batch-size 64] [--threads N] [--compile]
"""
import argparse
import time
from typing import Callable, Dict

import timm
import torch
from torch import nn

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.export import freeze


def build_variants() -> Dict[str, nn.Module]:
    lcnn = timm.create_model("lcnn_resnet18")
    relu = timm.create_model("cifar_resnet18", act_layer="relu")
    return {
        "relu": relu,
        "relu_frozen": freeze(relu),
        "standard": timm.create_model("cifar_resnet18"),
        "lcnn_relu": timm.create_model("lcnn_resnet18", act_layer="relu"),
        "lcnn": lcnn,
        "lcnn_frozen": freeze(lcnn),
        "lcnn_fused": freeze(lcnn, compiled_activations=True),
    }


def timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(models: Dict[str, nn.Module], x: torch.Tensor, bf16: bool, repeats: int) -> Dict[str, float]:
    def run(model: nn.Module) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x)

    for model in models.values():  # warm-up (oneDNN primitive caches, allocator)
        run(model)
    best = {name: float("inf") for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            best[name] = min(best[name], timed(lambda: run(model)))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd relu, lcnn, lcnn_frozen")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: model.eval() for name, model in build_variants().items()}
    if args.compile:
        models.update({f"{name}_compiled": torch.compile(models[name]) for name in ("relu", "lcnn", "lcnn_frozen")})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, 32x32, eval")
    for precision, bf16 in (("fp32", False), ("bf16+channels_last", True)):
        x = torch.rand(args.batch_size, 3, 32, 32)
        if bf16:
            x = x.to(memory_format=torch.channels_last)
            models = {name: model.to(memory_format=torch.channels_last) for name, model in models.items()}
        best = measure(models, x, bf16, args.repeats)
        print(f"\n{precision}")
        for name, seconds in best.items():
            compiled = f"   {seconds / best['relu_compiled']:.2f}x relu_compiled" if args.compile else ""
            print(f"  {name:>20}: {seconds * 1e3:8.1f} ms   {seconds / best['relu']:.2f}x relu   "
                  f"{seconds / best['relu_frozen']:.2f}x relu_frozen{compiled}")
    print("\ntarget: lcnn (lcnn_frozen, lcnn_fused) <= 1.15x relu")


if __name__ == "__main__":
    main()
