"""Per-epoch metrics: running means over a rank's steps, ``metrics.jsonl``, and PNG curves."""
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .checkpoint import atomic_write_text

__all__ = ["MeanMeter", "plot_metrics", "read_metrics", "write_metrics"]


class MeanMeter:
    """Example-weighted sums of scalar metrics, reducible across DDP ranks, checkpointable."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.count = 0

    def update(self, values: Dict[str, torch.Tensor], n: int) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * n
        self.count += n

    def means(self) -> Dict[str, float]:
        """Means over all ranks' examples (all-reduced when a process group is up)."""
        keys = sorted(self.sums)
        totals = torch.tensor([self.sums[k] for k in keys] + [float(self.count)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        count = max(totals[-1].item(), 1.0)
        return {k: totals[i].item() / count for i, k in enumerate(keys)}

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count = dict(state["sums"]), state["count"]


def read_metrics(path: Path) -> List[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_metrics(path: Path, rows: List[dict]) -> None:
    """Atomically (re)write ``metrics.jsonl`` with one JSON object per epoch."""
    atomic_write_text(Path(path), "".join(json.dumps(row) + "\n" for row in rows))


def plot_metrics(rows: List[dict], directory: Path, final: Optional[dict] = None) -> List[Path]:
    """One PNG per group of curves (losses, penalties, accuracy, beta/gamma, lr, speed) against epoch (1-based
    integer ticks, as printed). ``final`` (``final_eval.json``'s content) adds the final test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = {
        "losses": ["loss", "loss_ce", "loss_curvature", "loss_gradreg", "loss_cure", "val_loss"],
        "penalties": ["beta_sum", "abs_log_gamma_sum", "gradreg", "cure"],
        "accuracy": ["train_acc", "val_acc"],
        "beta_gamma": ["mean_beta", "mean_gamma"],
        "lr": ["lr"],
        "images_per_s": ["images_per_s"],
    }
    written = []
    for name, keys in groups.items():
        present = [k for k in keys if any(k in row and math.isfinite(row[k]) for row in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in present:
            points = [(row["epoch"] + 1, row[key]) for row in rows if key in row and math.isfinite(row[key])]
            images = next((row["val_images"] for row in rows if key.startswith("val_") and "val_images" in row), None)
            ax.plot(*zip(*points), marker="o", markersize=3,
                    label=f"{key} (first {images} test images)" if images else key)
        if name == "accuracy" and final and rows:
            ax.plot([rows[-1]["epoch"] + 1], [final["test_acc"]], marker="*", markersize=10, linestyle="none",
                    label=f"final test_acc {final['test_acc']:.3f} ({final['test_images']} images)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(directory) / f"{name}.png"
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
