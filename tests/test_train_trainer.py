"""The trainer end to end on a tiny registered model and a synthetic IDX dataset: outputs, resume after SIGKILL, NaN stop, config errors."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_tiny_models
from test_data import _write_idx

from lcnn_timm.layers import is_spectral_normalized, operator_norm, refresh_spectral_norms
from lcnn_timm.train.config import load_config, parse_overrides

RUNNER = Path(__file__).parent / "train_runner.py"


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """96 train / 32 test 8x8 images whose class (0..2) is a bright column band."""
    directory = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 32)):
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 60, (n, 8, 8))
        for i, label in enumerate(labels):
            images[i, :, 2 * label: 2 * label + 3] += 150
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def _args(idx_dir, output, *extra):
    return ["--model", "test_tiny_lcnn", "--model-kwargs", "{img_size: 8}", "--dataset", "fashion_mnist",
            "--data-dir", str(idx_dir), "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--sched", "multistep",
            "--decay-milestones", "[2]", "--beta-weight", "1e-3", "--gamma-weight", "1e-3", "--gradreg-weight",
            "1e-3", "--recovery-interval", "2", "--output", str(output), "--progress", "false",
            # pinned: 'auto' measures step times, so two runs could train in different cells and not be comparable
            "--amp", "false", "--channels-last", "false", *extra]


def _run(args, env=None, **kwargs):
    # the checkout under test first on the path, not whichever copy the environment installed
    path = os.pathsep.join(filter(None, [str(RUNNER.parents[1]), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, str(RUNNER), *args], env={**os.environ, "PYTHONPATH": path, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_outputs_metrics_plots_and_final_eval(idx_dir, tmp_path):
    proc = _run(_args(idx_dir, tmp_path, "--amp", "--channels-last", "--model-ema"))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    for key in ("loss", "loss_ce", "loss_curvature", "loss_gradreg", "beta_sum", "abs_log_gamma_sum", "gradreg",
                "train_acc", "val_acc", "mean_beta", "mean_gamma", "lr", "images_per_s"):
        assert all(key in row for row in rows), key
    assert rows[-1]["lr"] == pytest.approx(0.005)  # x0.1 at the milestone
    assert rows[-1]["loss"] < rows[0]["loss"]
    for name in ("losses", "penalties", "accuracy", "beta_gamma", "lr", "images_per_s"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    final = json.loads((tmp_path / "final_eval.json").read_text())
    assert 0.0 <= final["test_acc"] <= 1.0 and "test_ema_acc" in final
    last = json.loads((tmp_path / "last.json").read_text())
    weights = load_file(str(tmp_path / f"{last['checkpoint']}.safetensors"))
    final_weights = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(weights[k], final_weights[k]) for k in weights)
    # one file mode for every output (safetensors files were created 0600, the rest 0644; issue 25)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir() if path.is_file()}
    assert len(set(modes.values())) == 1, modes


@pytest.fixture(scope="module")
def reference_run(idx_dir, tmp_path_factory):
    """The uninterrupted run the resumed ones must reproduce bit for bit (do not modify its folder)."""
    out = tmp_path_factory.mktemp("reference")
    proc = _run(_args(idx_dir, out))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    return out


def assert_same_final_weights(expected_dir, got_dir):
    expected = load_file(str(expected_dir / "model.safetensors"))
    got = load_file(str(got_dir / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_sigkill_then_resume_reaches_the_uninterrupted_weights(idx_dir, tmp_path, reference_run):
    killed_dir = tmp_path / "killed"
    victim = _run(_args(idx_dir, killed_dir), env={"LCNN_TEST_STEP_DELAY": "0.05"})
    deadline = time.time() + 240  # generous: start-up alone can take a minute on a loaded CPU
    while time.time() < deadline:  # kill once a mid-training checkpoint of the second epoch exists
        pointer = killed_dir / "last.json"
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 8:
            break
        time.sleep(0.02)
    time.sleep(0.07)  # land inside a step, after the checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    step = json.loads((killed_dir / "last.json").read_text())["step"]
    assert 8 <= step < 18 and not (killed_dir / "model.safetensors").exists()
    assert (killed_dir / ".lock").is_file()  # the dead run's lock file: the kernel freed its flock, so it is no obstacle
    resumed = _run(_args(idx_dir, killed_dir, "--resume"))
    output, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and "resumed from" in output, output
    assert_same_final_weights(reference_run, killed_dir)
    rows = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(idx_dir, tmp_path):
    proc = _run(_args(idx_dir, tmp_path, "--recovery-interval", "0"), env={"LCNN_TEST_NAN_AT_STEP": "8"})
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output
    assert "non-finite at epoch 1, batch 2" in output and "last good checkpoint" in output
    pointer = json.loads((tmp_path / "last.json").read_text())
    assert pointer["step"] == 6  # the end-of-epoch-0 checkpoint; the bad step was never applied or saved
    weights = load_file(str(tmp_path / f"{pointer['checkpoint']}.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    assert not (tmp_path / "model.safetensors").exists()


def test_unknown_keys_and_bad_values_are_clear_errors(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: lcnn_resnet18\nwieght_decay: 5.0e-4\n")
    with pytest.raises(ValueError, match="'wieght_decay'.*weight_decay"):
        load_config(str(config))
    with pytest.raises(ValueError, match="'lr' expects float"):
        load_config(None, {"lr": "fast"})
    cfg = load_config(None, parse_overrides(["--beta-weight", "1e-3", "--amp", "--color-jitter", "0.4", "--resume"]))
    assert cfg.beta_weight == 1e-3 and cfg.amp and cfg.resume == "latest"
    assert load_config(None, {"amp": "auto"}).amp is None and load_config(None, {}).amp is None


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert cfg.model and cfg.epochs >= 1


def _stored_norm_errors(state_dict):
    """Per normalised layer: |sigma from the stored singular vectors / converged sigma - 1|."""
    model = train_tiny_models.tiny_lcnn(1, 3, 8)
    model.load_state_dict(state_dict)
    converged = copy.deepcopy(model)
    refresh_spectral_norms(converged)
    layers = [(a, b) for a, b in zip(model.modules(), converged.modules()) if is_spectral_normalized(a)]
    assert layers
    return [abs(operator_norm(a).item() / operator_norm(b).item() - 1) for a, b in layers]


def test_precise_bn_evaluates_and_saves_converged_spectral_norms(idx_dir, tmp_path):
    # Adam's steps are large against the normalised weights, so one power step per forward lags behind them
    proc = _run(_args(idx_dir, tmp_path, "--precise-bn-batches", "2", "--opt", "adam", "--lr", "0.5"))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    last = json.loads((tmp_path / "last.json").read_text())
    trained = _stored_norm_errors(load_file(str(tmp_path / f"{last['checkpoint']}.safetensors")))
    final = _stored_norm_errors(load_file(str(tmp_path / "model.safetensors")))
    assert max(trained) > 1e-2, trained  # the case this is for: the training's power iteration lags (29% here)
    assert max(final) < 1e-4, final
    assert json.loads((tmp_path / "final_eval.json").read_text())["normalized_layer_norm_max"] == pytest.approx(1, abs=1e-4)


def test_final_eval_reports_lagging_spectral_norms_without_precise_bn(idx_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("model: test_tiny_lcnn\n")
    out = tmp_path / "out"
    proc = _run(["--cli", "--config", str(config), *_args(idx_dir, out, "--opt", "adam", "--lr", "0.5")])
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    reported = json.loads((out / "final_eval.json").read_text())["normalized_layer_norm_max"]
    # independently: converged sigma / stored sigma of the saved weights, the largest over the layers
    expected = 1 / (1 - max(_stored_norm_errors(load_file(str(out / "model.safetensors")))))
    assert reported == pytest.approx(expected, rel=1e-4) and reported > 1.01
    assert f"operator norms up to {reported:.4f}, not 1" in output


def test_a_second_run_into_a_busy_folder_is_refused(idx_dir, tmp_path):
    """Two real processes, one folder (issue 25: both exited 0 and overwrote each other's checkpoints): the second
    gets one line naming the first's PID and exit 2, and the first finishes undisturbed."""
    config = tmp_path / "tiny.yaml"
    config.write_text("model: test_tiny_lcnn\n")
    out = tmp_path / "out"
    first = _run(["--cli", "--config", str(config), *_args(idx_dir, out)], env={"LCNN_TEST_STEP_DELAY": "0.2"})
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "last.json").is_file():  # the first run is writing checkpoints
        time.sleep(0.05)
    second = _run(["--cli", "--config", str(config), *_args(idx_dir, out, "--seed", "7")])
    output, _ = second.communicate(timeout=240)
    assert second.returncode == 2, output
    assert f"is in use by another lcnn-timm train (pid {first.pid})" in output and "Traceback" not in output
    output, _ = first.communicate(timeout=240)
    assert first.returncode == 0, output
    assert json.loads((out / "config.json").read_text())["seed"] == 42  # the first run's results, not the second's


def _mount(*args) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system: a read-only bind mount (root only; skipped elsewhere)."""
    source, target = tmp_path / "source", tmp_path / "read_only"
    source.mkdir()
    target.mkdir()
    if not (_mount("--bind", str(source), str(target)) and _mount("-o", "remount,ro,bind", str(target))):
        subprocess.run(["umount", str(target)], capture_output=True)
        pytest.skip("needs root and bind mounts for a read-only file system")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_unwritable_output_is_refused_before_any_work(idx_dir, read_only_dir):
    """Issue 25: a read-only output folder ran 65 s of set-up, then died with a raw OSError traceback."""
    from lcnn_timm_cli import main as lcnn_main

    config = read_only_dir.parent / "tiny.yaml"
    config.write_text("model: test_tiny_lcnn\n")
    proc = _run(["--cli", "--config", str(config), *_args(idx_dir, read_only_dir / "run")])
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Read-only file system; choose a writable output" in output, output
    assert "Traceback" not in output and "precision:" not in output  # refused before the model and the probe
    out = read_only_dir / "results.json"
    assert lcnn_main(["evaluate", "test_tiny_lcnn", "--dataset", "synthetic", "--out", str(out)]) == 2
    assert not any(read_only_dir.iterdir())


def test_full_disk_at_the_first_checkpoint_does_not_say_resume(idx_dir, tmp_path, monkeypatch):
    """It said both 'no earlier checkpoint exists' and 'resume with --resume' (which then refuses: nothing to
    resume)."""
    import errno

    from lcnn_timm.train import trainer as trainer_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module, "save_checkpoint", full_disk)
    trainer = trainer_module.Trainer(load_config(None, parse_overrides(_args(idx_dir, tmp_path / "run"))))
    with pytest.raises(trainer_module.CheckpointWriteError) as raised:
        trainer.save()
    message = str(raised.value)
    assert "No space left on device; no earlier checkpoint exists" in message and "--resume" not in message


def test_full_disk_while_saving_keeps_the_previous_checkpoint(idx_dir, tmp_path):
    """A real full file system (a 1 MiB tmpfs filled up after the first checkpoint): the second save fails with a
    message saying what happened, no temp file is left, and the first checkpoint still loads."""
    from lcnn_timm.train.checkpoint import checkpoint_candidates, load_checkpoint
    from lcnn_timm.train.trainer import CheckpointWriteError, Trainer

    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)):
        pytest.skip("needs root to mount a tmpfs")
    try:
        trainer = Trainer(load_config(None, parse_overrides(_args(idx_dir, disk / "run"))))  # locks: makes the folder
        trainer.save()
        first = trainer.last_checkpoint
        with open(disk / "filler", "wb") as filler:  # fill the file system to the last block
            with pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        trainer.step += 1
        with pytest.raises(CheckpointWriteError, match=r"No space left on device.*; the previous one, .* is intact"):
            trainer.save()
        assert not list(trainer.out_dir.glob(".*.tmp"))
        assert checkpoint_candidates(trainer.out_dir)[0] == first
        weights, state = load_checkpoint(first)
        assert state["step"] == 0 and weights
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: loaded weights may still map a file
