"""LCNN vs LCNN + gamma cap: training-step cost (interleaved, one run) and certified vs PGD accuracy.

Trains three copies of a small LCNN (same init, same batches) on Fashion-MNIST: plain, with
``lcnn_timm.certify.cap_gamma`` (cap 1), and with the cap plus cross-entropy on ``logit_scale * z``
(a loss temperature: the capped network is contracting, so its logits are tiny; certified radii
``margin / L`` do not depend on it), alternating their steps so all see the same machine load,
then reports per variant: median step time, clean accuracy, L2 PGD accuracy and first-order /
curvature-based / combined certified accuracy at each eps, and the certified bounds.

    python benchmarks/bench_certified.py [--steps 150] [--batch-size 64] [--count 300] [--threads 1] [--logit-scale 30]
"""
import argparse
import copy
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import lcnn_timm  # noqa: F401
from lcnn_timm.certify import cap_gamma
from lcnn_timm.certify.evaluate import certified_accuracy
from lcnn_timm.curvature import curvature_penalty
from lcnn_timm.data.fashion_mnist import load_fashion_mnist
from lcnn_timm.robustness.pgd import adversarial_accuracy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--count", type=int, default=300, help="test images for PGD and certificates")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eps", default="0.1,0.25,0.5")
    p.add_argument("--logit-scale", type=float, default=30.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    eps = tuple(float(e) for e in args.eps.split(","))
    torch.manual_seed(0)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    base = timm.create_model("lcnn_resnet18", num_classes=10, in_chans=1, img_size=28, layers=(1, 1),
                             channels=(8, 16))
    scaled = f"lcnn_gamma_cap_1_logit_scale_{args.logit_scale:g}"
    variants = {name: copy.deepcopy(base) for name in ("lcnn", "lcnn_gamma_cap_1", scaled)}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in variants.items()}
    scales = {name: args.logit_scale if name == scaled else 1.0 for name in variants}
    for name in ("lcnn_gamma_cap_1", scaled):
        cap_gamma(variants[name], optimizers[name], 1.0)
    times = {k: [] for k in variants}
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    for step in range(args.steps):
        index = order[step * args.batch_size:(step + 1) * args.batch_size]
        x, y = train_x[index].float() / 255, train_y[index]
        for name in (list(variants) if step % 2 == 0 else list(variants)[::-1]):  # interleaved, alternating order
            model, optimizer = variants[name], optimizers[name]
            model.train()
            start = time.perf_counter()
            loss = F.cross_entropy(scales[name] * model(x), y) + curvature_penalty(model, 1e-3, 1e-3).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    loader = [(test_x[i:i + 100].float() / 255, test_y[i:i + 100]) for i in range(0, args.count, 100)]
    report = {"steps": args.steps, "batch_size": args.batch_size, "count": args.count, "threads": args.threads}
    for name, model in variants.items():
        model.eval()
        with torch.no_grad():
            clean = sum((model(x).argmax(1) == y).sum().item() for x, y in
                        [(test_x[i:i + 1000].float() / 255, test_y[i:i + 1000]) for i in range(0, 10000, 1000)]) / 100
        pgd = {e: adversarial_accuracy(model, loader, e, progress=False)["accuracy"] for e in eps}
        cert = certified_accuracy(model, loader, eps, model, progress=False)
        gammas = [m.gamma.item() for m in model.modules() if hasattr(m, "log_gamma")]
        report[name] = {
            "median_step_s": statistics.median(times[name]), "clean_accuracy_10k": clean, "pgd": pgd,
            "certified": cert["levels"], "median_radius": cert["median_radius"],
            "lipschitz_bound_max": cert["lipschitz_bound"]["max"], "hessian_bound_max": cert["hessian_bound"]["max"],
            "gamma_range": [min(gammas), max(gammas)], "certify_seconds": cert["seconds"],
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
