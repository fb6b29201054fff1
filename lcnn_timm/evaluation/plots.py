"""Curvature histogram PNG written beside results.json."""
import os
import tempfile

import torch

__all__ = ["curvature_histogram"]


def curvature_histogram(values: torch.Tensor, path: str, title: str, bins: int = 40) -> None:
    """Histogram of per-example normalized curvature on a log x-axis (linear if any value is <= 0).

    Written atomically (temp file + rename).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hist-", suffix=".png")
        os.close(fd)
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        plt.close(fig)
