"""Precision parity: a short ``lcnn-timm train`` run per precision x memory-layout cell, against float32.

The same check runs in the test suite (CPU, where bf16 and fp16 autocast are emulated where not native) and in
``benchmarks/gpu_check.py`` on a CUDA device: each cell trains ``lcnn_resnet18_025`` for 64 steps on a small
synthetic task (:func:`write_row_band_dataset`) with precise BN, and is compared with the float32 run on

* accuracy (the task is learnt to 100% in float32);
* its BN statistics: the cell's re-estimated running variances against float32's re-estimation of the same
  weights on the same batches (the step that went wrong in issue 22);
* the saved spectral norms (``normalized_layer_norm_max``).
"""
import copy
import gzip
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from .config import load_config
from .trainer import Trainer

__all__ = ["PRECISIONS", "LAYOUTS", "bn_statistics_ratio", "precision_parity", "run_cell", "write_row_band_dataset"]

PRECISIONS = ("float32", "bfloat16", "float16")
LAYOUTS = ("contiguous", "channels_last")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_row_band_dataset(directory: Path, train: int = 256, test: int = 64) -> Path:
    """Fashion-MNIST-format IDX files of 8x8 images in 4 classes: class k has a bright band on rows 2k, 2k+1
    (flip-invariant, so the standard augmentation keeps the label)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 100, (n, 8, 8))
        for i, label in enumerate(labels):
            images[i, 2 * label: 2 * label + 2, :] += 150
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def run_cell(data_dir: Path, output: Path, precision: str, layout: str, device: str = "cpu",
             ) -> Tuple[Trainer, Dict[str, float], float]:
    """Train one cell (64 SGD steps, lr 0.05, precise BN on 4 batches); the trainer, its final evaluation
    and the wall seconds of the run."""
    if precision not in PRECISIONS or layout not in LAYOUTS:
        raise ValueError(f"cell {precision}/{layout}: precision must be one of {PRECISIONS}, layout one of {LAYOUTS}")
    cfg = load_config(None, dict(
        model="lcnn_resnet18_025", model_kwargs={"img_size": 8}, dataset="fashion_mnist", data_dir=str(data_dir),
        num_classes=4, in_chans=1, mean=[0.0], std=[1.0], crop_padding=0, epochs=8, batch_size=32, lr=0.05,
        decay_milestones=[7], beta_weight=1e-3, gamma_weight=1e-3, precise_bn_batches=4, output=str(output),
        progress=False, plot=False, device=device, amp=precision != "float32",
        amp_dtype="bfloat16" if precision == "float32" else precision, channels_last=layout == "channels_last"))
    start = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()
    return trainer, result, time.perf_counter() - start


def bn_statistics_ratio(trainer: Trainer, float32_trainer: Trainer) -> torch.Tensor:
    """Per channel of every BN layer: the cell's re-estimated running variance over float32's re-estimation of
    the same weights on the same batches (1 where the two precisions agree)."""
    refit = copy.deepcopy(trainer.model).to(memory_format=torch.contiguous_format)
    float32_trainer.recalibrate_batchnorm(trainer.cfg.precise_bn_batches, refit)
    cell = {k: v for k, v in trainer.model.state_dict().items() if k.endswith("running_var")}
    expected = {k: v for k, v in refit.state_dict().items() if k.endswith("running_var")}
    return torch.cat([(cell[k] / expected[k]).flatten().cpu() for k in expected])


def precision_parity(directory: Path, device: str = "cpu") -> List[Dict[str, object]]:
    """Every cell's run and its comparison with float32, as table rows (``benchmarks/gpu_check.py``)."""
    data = write_row_band_dataset(directory / "data")
    runs = {(p, m): run_cell(data, directory / f"{p}_{m}", p, m, device) for p in PRECISIONS for m in LAYOUTS}
    reference = runs["float32", "contiguous"][0]
    rows = []
    for (precision, layout), (trainer, result, seconds) in runs.items():
        ratios = bn_statistics_ratio(trainer, reference)
        rows.append({"cell": f"{precision}/{layout}", "test_acc": result["test_acc"], "seconds": seconds,
                     "bn_ratio_min": ratios.min().item(), "bn_ratio_max": ratios.max().item(),
                     "normalized_layer_norm_max": result["normalized_layer_norm_max"]})
    return rows
