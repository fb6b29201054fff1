"""Certified robustness on Fashion-MNIST, side by side: deel-torchlip's Fashion-MNIST example vs a 1-Lipschitz LCNN.

A first measurement for issue 23 section 2, not its deliverable: the LCNN here is a prototype built in this script
from the package's layers (not a registered family, no shipped weights). Same data, same epochs, same batches, same
optimiser (Adam 1e-3, batch 100), and the same radius code (``lcnn_timm.certify.radius.certified_radii``):

* ``torchlip``: the network and loss of deel-torchlip's ``wasserstein_classification_fashionMNIST`` notebook
  (SpectralConv2d + GroupSort2 + ScaledL2NormPool2d, FrobeniusLinear head, LseHKRMulticlassLoss(0.9, 1.0, 10)),
  exported with ``vanilla_export``. Its logit map is 1-Lipschitz by construction (the library's claim, not
  re-proved here), so ``L_ij = sqrt(2)``; GroupSort is not twice differentiable, so only first-order radii.
* ``lcnn``: operator-norm spectrally normalised convs (stride 2 to downsample) and linears with centered softplus,
  certified by ``lcnn_timm.certify.certify`` (Lipschitz and Hessian bounds of every logit difference); trained with
  cross-entropy on ``temperature * (z_j + margin * L_j)`` for ``j != y`` (a Lipschitz-margin loss, ``L_j`` the head's
  ``||w_y - w_j||``) plus ``beta_weight * sum(beta)``, which keeps the Hessian bound small.

Reports clean accuracy, certified accuracy (first-order, curvature-based, combined) and L2 PGD accuracy at each
radius (pixels in [0, 1]) on the first ``--count`` test images, the share of images whose curvature-based radius
exceeds the first-order one, and the training seconds, with the CPU's name. Needs ``pip install deel-torchlip``.

    python benchmarks/bench_certified_peer.py [--epochs 3] [--count 1000] [--train-count 60000]
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lcnn_timm.certify import certify
from lcnn_timm.certify.bounds import Certificate, MapBound
from lcnn_timm.certify.radius import certified_radii
from lcnn_timm.data.fashion_mnist import load_fashion_mnist
from lcnn_timm.layers import CenteredSoftplus, spectral_norm
from lcnn_timm.robustness.pgd import pgd_attack

from bench_step import cpu_name  # the benchmark next to this script

RADII = (0.1, 0.25, 0.5, 1.0)


def torchlip_model() -> nn.Module:
    from deel import torchlip

    return torchlip.Sequential(
        torchlip.SpectralConv2d(1, 16, (3, 3), padding="same"), torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
        torchlip.SpectralConv2d(16, 32, (3, 3), padding="same"), torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
        nn.Flatten(), torchlip.SpectralLinear(1568, 64), torchlip.GroupSort2(),
        torchlip.FrobeniusLinear(64, 10, bias=True, disjoint_neurons=True), k_coef_lip=1.0,
    )


def lcnn_model(beta: float) -> nn.Module:
    return nn.Sequential(
        spectral_norm(nn.Conv2d(1, 32, 3, padding=1), (28, 28)), CenteredSoftplus(beta),
        spectral_norm(nn.Conv2d(32, 64, 4, stride=2, padding=1), (28, 28)), CenteredSoftplus(beta),
        spectral_norm(nn.Conv2d(64, 64, 4, stride=2, padding=1), (14, 14)), CenteredSoftplus(beta),
        nn.Flatten(), spectral_norm(nn.Linear(64 * 7 * 7, 128)), CenteredSoftplus(beta),
        spectral_norm(nn.Linear(128, 10)),
    )


def lcnn_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor, margin: float, temperature: float,
              beta_weight: float) -> torch.Tensor:
    head = model[-1].weight  # the effective (normalised) head weight
    rows = (head[y][:, None, :] - head[None, :, :]).norm(dim=-1)  # ||w_y - w_j||, (batch, classes)
    shifted = logits + margin * rows  # rows[y] = 0: the true class is not shifted
    betas = sum(m.beta for m in model.modules() if isinstance(m, CenteredSoftplus))
    return F.cross_entropy(temperature * shifted, y) + beta_weight * betas


def train(model, loss_fn, images, labels, epochs, seed):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for batch in order.split(100):
            x, y = images[batch], labels[batch]
            with parametrize.cached():  # the loss reads the head's weight once more: the same normalised copy
                loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        print(f"  epoch {epoch + 1}: loss {total / len(images):.4f}", flush=True)
    return time.perf_counter() - start


def evaluate(name, model, certificate, images, labels, seconds):
    model = model.double().eval()
    x, y = images.double(), labels
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item() * 100
    radii = certified_radii(model, x, y, certificate)
    row = {"model": name, "clean": clean, "train_s": seconds}
    for eps in RADII:
        adv = pgd_attack(model, x, y, eps, steps=10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            row[f"pgd@{eps}"] = (model(adv).argmax(1) == y).float().mean().item() * 100
        for kind in ("first_order", "curvature", "combined"):
            row[f"{kind}@{eps}"] = (radii[kind] > eps).float().mean().item() * 100
    correct = radii["combined"] > 0
    row["curvature_beats_first_order"] = (radii["curvature"] > radii["first_order"]).float().mean().item() * 100
    row["median_first_order"] = radii["first_order"][correct].median().item() if correct.any() else 0.0
    row["median_curvature"] = radii["curvature"][correct].median().item() if correct.any() else 0.0
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--count", type=int, default=1000, help="test images evaluated")
    p.add_argument("--train-count", type=int, default=60000)
    p.add_argument("--margin", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--beta-weight", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x, train_y = train_x[: args.train_count].float() / 255, train_y[: args.train_count]
    test_x, test_y = test_x[: args.count].float() / 255, test_y[: args.count]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    rows = []

    torch.manual_seed(args.seed)
    print("lcnn", flush=True)
    lcnn = lcnn_model(args.beta)
    seconds = train(lcnn, lambda z, y: lcnn_loss(lcnn, z, y, args.margin, args.temperature, args.beta_weight),
                    train_x, train_y, args.epochs, args.seed)
    lcnn.eval()
    certificate = certify(lcnn, (1, 28, 28))
    rows.append(evaluate("lcnn", lcnn, certificate, test_x, test_y, seconds))
    print(f"  L_ij max {certificate.lipschitz.max().item():.3f}, K_ij max {certificate.hessian.max().item():.3f}")

    try:
        from deel import torchlip
    except ImportError:
        print("deel-torchlip is not installed (pip install deel-torchlip): its row is skipped")
    else:
        torch.manual_seed(args.seed)
        print("torchlip", flush=True)
        peer = torchlip_model()
        hkr = torchlip.LseHKRMulticlassLoss(alpha=0.9, min_margin=1.0, temperature=10.0)
        seconds = train(peer, lambda z, y: hkr(z, F.one_hot(y, 10)), train_x, train_y, args.epochs, args.seed)
        vanilla = peer.vanilla_export().eval()
        pairs = math.sqrt(2.0) * (1.0 - torch.eye(10, dtype=torch.float64))
        certificate = Certificate(pairs, torch.where(pairs > 0, math.inf, 0.0),
                                  MapBound(torch.tensor(1.0), torch.tensor(math.inf)), (1, 28, 28))
        rows.append(evaluate("torchlip", vanilla, certificate, test_x, test_y, seconds))

    keys = ["clean"] + [f"{k}@{e}" for e in RADII for k in ("first_order", "curvature", "combined", "pgd")]
    print("\n| " + " | ".join(["model", *keys, "curv > 1st (%)", "median r 1st / curv", "train s"]) + " |")
    for r in rows:
        cells = [f"{r[k]:.1f}" for k in keys]
        print(f"| {r['model']} | " + " | ".join(cells) + f" | {r['curvature_beats_first_order']:.1f} | "
              f"{r['median_first_order']:.3f} / {r['median_curvature']:.3f} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
