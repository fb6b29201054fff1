"""Two-process torchrun (gloo, CPU): every rank ends with identical weights and buffers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_trainer import idx_dir  # noqa: F401  (fixture)

RUNNER = Path(__file__).parent / "train_runner.py"


@pytest.mark.parametrize("regime", [
    ["--beta-weight", "1e-3", "--gamma-weight", "1e-3", "--gradreg-weight", "1e-3", "--model-ema"],
    ["--cure-weight", "1e-3", "--adv-training"],
], ids=["lcnn_gradreg_ema", "cure_adversarial"])
def test_two_rank_gloo_run_ends_with_identical_weights(idx_dir, tmp_path, regime):  # noqa: F811
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(RUNNER), "--model", "test_tiny_lcnn", "--model-kwargs", "{img_size: 8}", "--dataset",
               "fashion_mnist", "--data-dir", str(idx_dir), "--epochs", "2", "--batch-size", "8", "--lr", "0.05",
               "--output", str(tmp_path), "--progress", "false", "--plot", "false", *regime]
    proc = subprocess.run(command, env={**os.environ, "LCNN_TEST_DUMP_RANKS": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert (tmp_path / "final_eval.json").is_file()
