"""Certified robustness on Fashion-MNIST, side by side: deel-torchlip's Fashion-MNIST example vs ``lcnn_lipcnn``.

Issue 23 section 2. Same data, same epochs, same batches, same optimiser (Adam 1e-3, batch 100, no augmentation),
and the same radius code (``lcnn_timm.certify.radius.certified_radii``):

* ``torchlip``: the network and loss of deel-torchlip's ``wasserstein_classification_fashionMNIST`` notebook
  (SpectralConv2d + GroupSort2 + ScaledL2NormPool2d, FrobeniusLinear head, LseHKRMulticlassLoss(0.9, 1.0, 10)),
  exported with ``vanilla_export``, certified by :func:`peer_certificate`: ``L_ij = ||w_i - w_j|| *`` the product of
  its body's certified layer norms (convs and linears by the package's operator-norm bounds at their input sizes,
  as for ``lcnn_lipcnn``; GroupSort and non-overlapping L2-norm pooling are 1-Lipschitz). GroupSort is not twice
  differentiable, so only first-order radii (``K = inf``: the gradient-path radius is then the first-order one).
  The peer notebook's own formula, margin / 2 (``||w_i - w_j|| <= 2`` for unit rows, body 1-Lipschitz by the
  library's construction), is reported beside it as ``documented``. (Before 2026-12-07 this benchmark used
  ``L_ij = sqrt(2)``, i.e. a 1-Lipschitz logit map, which the ``disjoint_neurons`` head is not: its rows have norm 1
  but ``||w_i - w_j||`` reaches 1.78 (issue 34), so those radii were not proved.)
* ``lcnn``: the registered ``lcnn_lipcnn`` (1-Lipschitz, Softplus MaxMin), trained with the package's certified-margin
  loss (``lcnn_timm.train.certified_loss``) plus ``beta_weight * sum(beta)``, as ``configs/fashion_mnist_lipcnn.yaml``
  does, and certified by ``lcnn_timm.certify.certify`` (Lipschitz and Hessian bounds of every logit difference).

Reports clean accuracy, certified accuracy (first-order, curvature-based, gradient-path "combined") and L2 PGD accuracy
at each radius (pixels in [0, 1]) on the first ``--count`` test images, the radius distribution (quantiles over the
correctly classified images), the share of images whose curvature-based and combined radii exceed the first-order one,
and the training seconds, with the CPU's name; ``--json`` writes it all. Needs ``pip install deel-torchlip``.

    python benchmarks/bench_certified_peer.py [--epochs 3] [--count 1000] [--train-count 60000] [--json PATH]
"""
import argparse
import json
import math
import time
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lcnn_timm  # noqa: F401  (registers lcnn_lipcnn)
from lcnn_timm.certify import certify
from lcnn_timm.certify.bounds import Certificate, MapBound
from lcnn_timm.certify.operator_norm import ROUNDING_MARGIN, conv_norm_bound, gram_norm_bound
from lcnn_timm.certify.radius import certified_radii
from lcnn_timm.curvature.penalty import curvature_penalty
from lcnn_timm.data.fashion_mnist import load_fashion_mnist
from lcnn_timm.layers.spectral_norm import operator_for
from lcnn_timm.robustness.pgd import pgd_attack
from lcnn_timm.train.certified_loss import LipschitzMarginLoss

from bench_step import cpu_name  # the benchmark next to this script

RADII = (0.1, 0.25, 0.5, 1.0)
KINDS = ("first_order", "curvature", "combined")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


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


def _is_groupsort(module: nn.Module) -> bool:
    """deel-torchlip's GroupSort (a sort within channel groups: a permutation of its input wherever it is evaluated,
    so 1-Lipschitz), matched by its defining module, not only its name."""
    return type(module).__module__.startswith("deel.torchlip") and type(module).__name__.startswith("GroupSort")


def _layer_norm_bound(module: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Certified Lipschitz bound of one exported peer layer at ``input_shape`` (without batch), float64."""
    if isinstance(module, nn.Conv2d):
        return conv_norm_bound(module.weight.detach(), operator_for(module, input_shape[-2:]))
    if isinstance(module, nn.Linear):
        return gram_norm_bound(module.weight.detach())
    if type(module) is nn.Flatten or _is_groupsort(module):
        return torch.tensor(1.0, dtype=torch.float64)
    if type(module) is nn.LPPool2d and module.norm_type == 2 and (module.stride is None or
                                                                   module.stride == module.kernel_size):
        # the L2 norm of each window, windows disjoint: sum_w (|x_w| - |y_w|)^2 <= sum_w |x_w - y_w|^2
        return torch.tensor(1.0, dtype=torch.float64)
    raise ValueError(f"no certified bound for the peer's {type(module).__name__} layer")


def peer_certificate(model: nn.Sequential, input_shape: Sequence[int]) -> Certificate:
    """First-order certificate of an exported deel-torchlip chain whose last layer is a linear head:
    ``L_ij = ||w_i - w_j|| * prod(body layer bounds)``, ``K_ij = inf`` (GroupSort is not twice differentiable)."""
    shapes = {}

    def record(module: nn.Module, args) -> None:
        shapes[id(module)] = args[0].shape[1:]

    handles = [m.register_forward_pre_hook(record) for m in model]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype))
    for handle in handles:
        handle.remove()
    *body, head = model
    body_bound = torch.tensor(1.0, dtype=torch.float64)
    for layer in body:
        body_bound = body_bound * _layer_norm_bound(layer, shapes[id(layer)])
    weight = head.weight.detach().double()
    pairs = torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist") * (1.0 + ROUNDING_MARGIN)
    lipschitz = pairs * body_bound
    return Certificate(lipschitz, torch.where(lipschitz > 0, math.inf, 0.0),
                       MapBound(body_bound * gram_norm_bound(weight), torch.tensor(math.inf)), tuple(input_shape))


def documented_certificate(classes: int, input_shape: Sequence[int]) -> Certificate:
    """The peer notebook's radius, margin / 2: ``L_ij = 2`` (unit-norm head rows, body 1-Lipschitz by construction)."""
    lipschitz = 2.0 * (1.0 - torch.eye(classes, dtype=torch.float64))
    return Certificate(lipschitz, torch.where(lipschitz > 0, math.inf, 0.0),
                       MapBound(torch.tensor(math.inf), torch.tensor(math.inf)), tuple(input_shape))


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
        for kind in KINDS:
            row[f"{kind}@{eps}"] = (radii[kind] > eps).float().mean().item() * 100
    correct = radii["first_order"] > 0
    for kind in ("curvature", "combined"):
        row[f"{kind}_beats_first_order"] = (radii[kind] > radii["first_order"]).float().mean().item() * 100
        gain = radii[kind][correct] / radii["first_order"][correct]
        row[f"{kind}_gain_quantiles"] = torch.quantile(gain, torch.tensor(QUANTILES, dtype=gain.dtype)).tolist()
    for kind in KINDS:
        values = radii[kind][correct]
        row[f"{kind}_quantiles"] = torch.quantile(values, torch.tensor(QUANTILES, dtype=values.dtype)).tolist()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--count", type=int, default=1000, help="test images evaluated")
    p.add_argument("--train-count", type=int, default=60000)
    p.add_argument("--margin", type=float, default=0.15, help="certified_margin of the LCNN's loss")
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--beta", type=float, default=2.0, help="initial beta of every Softplus MaxMin")
    p.add_argument("--beta-weight", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows (and the machine) to this file")
    args = p.parse_args()
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x, train_y = train_x[: args.train_count].float() / 255, train_y[: args.train_count]
    test_x, test_y = test_x[: args.count].float() / 255, test_y[: args.count]
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(machine, flush=True)
    rows = []

    torch.manual_seed(args.seed)
    print("lcnn_lipcnn", flush=True)
    lcnn = timm.create_model("lcnn_lipcnn", beta=args.beta)
    margin_loss = LipschitzMarginLoss(lcnn.get_classifier(), args.margin, args.temperature)
    seconds = train(lcnn, lambda z, y: margin_loss(z, y) + curvature_penalty(lcnn, args.beta_weight, 0.0).total,
                    train_x, train_y, args.epochs, args.seed)
    lcnn.eval()
    certificate = certify(lcnn.double())
    rows.append(evaluate("lcnn_lipcnn", lcnn, certificate, test_x, test_y, seconds))
    off = ~torch.eye(10, dtype=torch.bool)
    rows[-1].update(lipschitz_max=certificate.lipschitz[off].max().item(), hessian_max=certificate.hessian[off].max().item())
    print(f"  L_ij max {rows[-1]['lipschitz_max']:.3f}, K_ij max {rows[-1]['hessian_max']:.3f}")

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
        vanilla = peer.vanilla_export().eval().double()
        certificate = peer_certificate(vanilla, (1, 28, 28))
        rows.append(evaluate("torchlip", vanilla, certificate, test_x, test_y, seconds))
        off = ~torch.eye(10, dtype=torch.bool)
        rows[-1].update(lipschitz_max=certificate.lipschitz[off].max().item())
        documented = evaluate("torchlip (documented margin / 2)", vanilla, documented_certificate(10, (1, 28, 28)),
                              test_x, test_y, seconds)
        rows.append(documented)
        print(f"  L_ij max {rows[-2]['lipschitz_max']:.3f} (sound, per pair) vs 2 (documented)")

    keys = ["clean"] + [f"{k}@{e}" for e in RADII for k in (*KINDS, "pgd")]
    print("\n| " + " | ".join(["model", *keys, "curv > 1st (%)", "combined > 1st (%)", "train s"]) + " |")
    for r in rows:
        cells = [f"{r[k]:.1f}" for k in keys]
        print(f"| {r['model']} | " + " | ".join(cells) + f" | {r['curvature_beats_first_order']:.1f} | "
              f"{r['combined_beats_first_order']:.1f} | {r['train_s']:.0f} |")
    print(f"\nradius quantiles {QUANTILES} over correctly classified images:")
    for r in rows:
        for kind in KINDS:
            print(f"  {r['model']} {kind}: " + " / ".join(f"{v:.3f}" for v in r[f"{kind}_quantiles"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
