"""Certified-margin training: the loss against an independent formula, through LCNNTask, and a trainer run of
``lcnn_lipcnn`` whose certified accuracy at the trained margin beats an un-margined run's."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from test_train_task import _data
from test_train_trainer import _run, idx_dir  # noqa: F401  (fixture)

from lcnn_timm.train import LCNNTask
from lcnn_timm.train.certified_loss import LipschitzMarginLoss


def test_loss_is_cross_entropy_on_pairwise_margin_shifted_logits():
    torch.manual_seed(0)
    head = nn.Linear(5, 4)
    logits, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 2])
    loss = LipschitzMarginLoss(head, margin=0.3, temperature=7.0)(logits, target)
    expected = 0.0
    for z, y in zip(logits, target):
        shifted = torch.stack([z[j] + 0.3 * (head.weight[y] - head.weight[j]).norm() for j in range(4)])
        expected = expected + F.cross_entropy(7.0 * shifted[None], y[None]) / 6
    torch.testing.assert_close(loss, expected)
    loss.backward()  # ||w_y - w_y|| = 0 on the diagonal: the gradient stays finite
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="Linear classifier"):
        LipschitzMarginLoss(nn.Identity(), 0.1)
    with pytest.raises(ValueError, match="margin must be > 0"):
        LipschitzMarginLoss(nn.Linear(2, 2), 0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LipschitzMarginLoss(nn.Linear(2, 2), 0.1, temperature=-1.0)


def _tiny_lipcnn():
    torch.manual_seed(0)
    return timm.create_model("lcnn_lipcnn", img_size=8, stem_chs=4, stage_channels=(4,), dense_chs=4, num_classes=3)


def test_task_loss_reads_the_head_weight_its_forward_used():
    """One power-iteration step per training forward: the loss reading the head's weight must not run a second."""
    images, labels = _data()
    reference, model = _tiny_lipcnn().train(), _tiny_lipcnn().train()
    reference(images)
    LCNNTask(model, LipschitzMarginLoss(model.get_classifier(), margin=0.2))(images, labels)
    u = "fc.parametrizations.weight.0._u"
    assert torch.equal(model.state_dict()[u], reference.state_dict()[u])


def test_task_lowers_the_certified_margin_loss():
    model = _tiny_lipcnn()
    task = LCNNTask(model, LipschitzMarginLoss(model.get_classifier(), margin=0.2), beta_weight=1e-3)
    images, labels = _data()
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        result = task(images, labels)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        losses.append(result["loss"].item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_trainer_trains_lipcnn_with_the_certified_margin_loss(idx_dir, tmp_path):  # noqa: F811
    args = ["--model", "lcnn_lipcnn", "--model-kwargs", "{img_size: 8, stem_chs: 4, stage_channels: [8], dense_chs: 8}",
            "--dataset", "fashion_mnist", "--data-dir", str(idx_dir), "--epochs", "5", "--batch-size", "16",
            "--opt", "adam", "--lr", "0.02", "--sched", "cosine", "--beta-weight", "1e-2", "--certified-margin",
            "0.1", "--output", str(tmp_path), "--progress", "false", "--amp", "false", "--channels-last", "false",
            "--hflip", "0", "--crop-padding", "0"]  # a flip swaps the fixture's classes 0 and 2 (column bands)
    proc = _run(args)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["val_acc"] > 0.5, rows  # chance: 1/3


def test_trainer_refuses_smoothing_with_the_certified_margin_loss(idx_dir, tmp_path):  # noqa: F811
    config = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_lipcnn.yaml"
    proc = _run(["--cli", "--config", str(config), "--model-kwargs", "{img_size: 8}", "--img-size", "8",
                 "--data-dir", str(idx_dir), "--smoothing", "0.1", "--output", str(tmp_path), "--progress", "false"])
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "smoothing and certified_margin do not combine" in output, output
    assert "Traceback" not in output
