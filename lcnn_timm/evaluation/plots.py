"""Figures of evaluation results: one model's curvature histogram, and the comparison of several models."""
import os
import tempfile
from pathlib import Path
from typing import Sequence, Tuple, Union

import torch

__all__ = ["curvature_histogram", "curvature_robustness_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_atomic(fig, path: Union[str, Path]) -> None:
    """Write the PNG to a temp file beside ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fig-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def curvature_histogram(values: torch.Tensor, path: str, title: str, bins: int = 40) -> None:
    """Histogram of per-example normalized curvature on a log x-axis (linear if any value is <= 0)."""
    import numpy as np

    plt = _pyplot()
    v = values.detach().double().cpu().numpy()
    log_scale = bool((v > 0).all()) and v.max() > v.min()
    edges = np.geomspace(v.min(), v.max(), bins + 1) if log_scale else bins
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.hist(v, bins=edges, color="tab:blue", edgecolor="white")
        if log_scale:
            ax.set_xscale("log")
        ax.axvline(v.mean(), color="tab:red", linestyle="--", label=f"mean {v.mean():.4g}")
        ax.axvline(np.median(v), color="tab:orange", linestyle=":", label=f"median {np.median(v):.4g}")
        ax.set_xlabel("normalized curvature $C_f(x) = \\|H\\|_2 / (\\|g\\|_2 + \\epsilon)$")
        ax.set_ylabel("examples")
        ax.set_title(title, fontsize=9)
        ax.legend()
        fig.tight_layout()
        _save_atomic(fig, path)
    finally:
        plt.close(fig)


def curvature_robustness_figure(rows: Sequence[Tuple[str, Union[str, Path]]], path: Union[str, Path]) -> None:
    """Two panels from (label, results.json) pairs: mean C_f vs L2-PGD accuracy, and per-example C_f per model.

    The per-example values are read from the ``*_curvature.json`` file each results.json names; models whose
    curvature was not measured (piecewise-linear activations) are left out.
    """
    from .results import load_per_example, load_results

    plt = _pyplot()
    loaded = []
    for label, results_path in rows:
        metrics = load_results(str(results_path))["metrics"]
        curvature = metrics["curvature"]
        if curvature.get("meaningful") and "per_example" in curvature:
            per_example = load_per_example(str(Path(results_path).parent / curvature["per_example"]))
            loaded.append((label, metrics["pgd"], curvature, per_example))
    if not loaded:
        raise ValueError("none of the results has per-example curvature to plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), dpi=100, width_ratios=(1.25, 1))
    try:
        markers = "osD^vP*Xh"
        eps_values = [r["eps"] for r in loaded[0][1]]
        colors = plt.cm.viridis([0.85 * i / max(len(eps_values) - 1, 1) for i in range(len(eps_values))])
        for (label, pgd, curvature, _), marker in zip(loaded, markers):
            for r, color in zip(pgd, colors):
                left.scatter(curvature["curvature"]["mean"], r["accuracy"], marker=marker, color=color, s=45)
            left.scatter([], [], marker=marker, color="gray", label=label)
        for eps, color in zip(eps_values, colors):
            left.scatter([], [], marker="s", color=color, label=f"L2 ε = {eps:g}")
        left.set_xscale("log")
        left.set_xlabel("mean normalized curvature E C_f (log)")
        left.set_ylabel("L2 PGD accuracy (%)")
        left.set_title("curvature vs adversarial accuracy", fontsize=10)
        left.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        right.boxplot([v.numpy() for *_, v in loaded], whis=(5, 95), showfliers=False)
        right.set_xticks(range(1, len(loaded) + 1), [label for label, *_ in loaded], rotation=20, fontsize=8)
        right.set_yscale("log")
        right.set_ylabel("per-example C_f (log; box: quartiles, whiskers: 5-95%)")
        count = loaded[0][2]["count"]
        right.set_title(f"per-example curvature, first {count} test images", fontsize=10)
        fig.tight_layout()
        _save_atomic(fig, path)
    finally:
        plt.close(fig)
