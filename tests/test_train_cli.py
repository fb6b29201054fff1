"""``lcnn-timm train`` as a user meets it: Ctrl-C and resume, damaged checkpoints, clear set-up errors, the precision
choice, what the per-epoch validation measures, and convert-and-train."""
import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_trainer import _args, _run, assert_same_final_weights, idx_dir, reference_run  # noqa: F401

import train_tiny_models  # noqa: F401  (registers the tiny models in this process too)

from lcnn_timm.train.cli import main as train_main

@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text("plot: false\n")
    return str(path)


def _cli(config, *args):
    return ["--cli", "--config", config, *args]


def _finish(proc, timeout=120):
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def _in_process(capsys, args):
    """Run ``lcnn-timm train`` in this process (no interpreter start-up): (exit status, stdout + stderr)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the runner: bit-identical comparisons need the same reduction order
    try:
        code = train_main(args[1:])  # drop the runner's --cli
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _pointer(out):
    return json.loads((out / "last.json").read_text())


def test_sigint_checkpoints_the_current_step_and_resume_is_bit_identical(idx_dir, config, tmp_path,
                                                                         reference_run):  # noqa: F811
    out = tmp_path / "run"
    # no mid-epoch recovery checkpoints: the only mid-epoch one must come from the signal
    args = _cli(config, *_args(idx_dir, out, "--recovery-interval", "0"))
    victim = _run(args, env={"LCNN_TEST_STEP_DELAY": "0.3"})
    deadline = time.time() + 240  # generous: start-up alone can take a minute on a loaded CPU
    while time.time() < deadline and not ((out / "last.json").is_file() and _pointer(out)["step"] == 6):
        time.sleep(0.02)  # the end-of-epoch-0 checkpoint (6 steps an epoch)
    time.sleep(0.5)  # inside epoch 1
    victim.send_signal(signal.SIGINT)
    code, output = _finish(victim, timeout=60)
    assert code == 128 + signal.SIGINT, output
    assert "Traceback" not in output, output
    step = _pointer(out)["step"]
    assert 6 < step < 12, output  # the step that was running, mid-epoch
    # the two messages name the same step (they said "finishing step 6", then "interrupted ... (step 7)")
    assert f"finishing step {step} " in output and f"(step {step})" in output, output
    assert f"--resume" in output.split("resume with:")[1], output
    assert not (out / "model.safetensors").exists()
    code, output = _finish(_run(args + ["--resume"]))
    assert code == 0 and f"ckpt-{step:09d}" in output and f"batch {step - 6}" in output, output
    assert_same_final_weights(reference_run, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]


def test_sigint_after_a_steps_backward_stops_at_that_step(idx_dir, config, tmp_path):  # noqa: F811
    """A signal that lands after a step's agreement used to run one more step than the message named."""
    out = tmp_path / "run"
    code, output = _finish(_run(_cli(config, *_args(idx_dir, out, "--recovery-interval", "0")),
                                env={"LCNN_TEST_SIGINT_IN_STEP": "8"}), timeout=120)
    assert code == 128 + signal.SIGINT, output
    assert _pointer(out)["step"] == 8 and "finishing step 8 " in output and "(step 8)" in output, output


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(idx_dir, config, tmp_path, capsys,
                                                                 reference_run):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    newest = out / f"{_pointer(out)['checkpoint']}.state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a copy cut short
    previous = [p.name for p in out.glob("ckpt-*.safetensors") if p.stem != _pointer(out)["checkpoint"]]
    assert len(previous) == 1  # the newest checkpoint and one fallback are kept
    for name in ("model.safetensors", "final_eval.json"):
        (out / name).unlink()
    code, output = _in_process(capsys, _cli(config, *_args(idx_dir, out, "--resume")))
    assert code == 0 and "unreadable" in output and f"resumed from {out / previous[0]}" in output, output
    assert_same_final_weights(reference_run, out)


def test_resume_errors_are_one_line_and_write_nothing(idx_dir, config, tmp_path, capsys, reference_run):  # noqa: F811
    fresh = tmp_path / "fresh"
    code, output = _in_process(capsys, _cli(config, *_args(idx_dir, fresh, "--resume")))
    assert code == 2 and "nothing to resume" in output and "Traceback" not in output, output
    assert not fresh.exists()

    damaged = tmp_path / "damaged"
    shutil.copytree(reference_run, damaged)
    for path in damaged.glob("ckpt-*.safetensors"):
        path.write_bytes(path.read_bytes()[:50])
    code, output = _in_process(capsys, _cli(config, *_args(idx_dir, damaged, "--resume")))
    assert code == 2 and "no readable checkpoint" in output and "Traceback" not in output, output
    # "trying an older checkpoint" only while there is an older one to try (issue 25): two pairs, one such line
    assert output.count("trying an older checkpoint") == len(list(damaged.glob("ckpt-*.safetensors"))) - 1, output

    other = tmp_path / "other"
    code, output = _in_process(capsys, _cli(config, *_args(idx_dir, other, "--model", "test_tiny_standard",
                                                            "--resume", str(reference_run))))
    message = [line for line in output.splitlines() if line.startswith("lcnn-timm train:")]
    assert code == 2 and len(message) == 1 and "does not fit model 'test_tiny_standard'" in message[0], output
    assert "missing" in message[0] and "unexpected" in message[0] and "more)" in message[0], output
    assert len(message[0]) < 600 and not other.exists()


def test_set_up_errors_are_one_line_with_status_2(idx_dir, config, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    code, output = _in_process(capsys, _cli(config, *_args(tmp_path / "no_such_dir", out)))
    assert code == 2 and "no_such_dir does not exist" in output and "Traceback" not in output, output
    assert not out.exists()
    code, output = _in_process(capsys, ["--cli", *_args(idx_dir, out)])
    assert code == 2 and "no --config given" in output and not out.exists(), output


def test_per_epoch_validation_uses_the_final_batchnorm_statistics(idx_dir, config, tmp_path, capsys,
                                                                   reference_run):  # noqa: F811
    code, output = _in_process(capsys, _cli(config, *_args(idx_dir, tmp_path, "--precise-bn-batches", "2")))
    assert code == 0, output
    # the re-estimation works on a copy: training (last checkpoint) is bit-identical to a run without it ...
    last = load_file(str(tmp_path / f"{_pointer(tmp_path)['checkpoint']}.safetensors"))
    reference = load_file(str(reference_run / f"{_pointer(reference_run)['checkpoint']}.safetensors"))
    assert all(torch.equal(last[k], reference[k]) for k in reference)
    # ... while the final weights carry the re-estimated statistics
    final_weights = load_file(str(tmp_path / "model.safetensors"))
    stats = [k for k in last if k.endswith("running_mean")]
    assert stats and not any(torch.equal(last[k], final_weights[k]) for k in stats)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((tmp_path / "final_eval.json").read_text())
    # validation and the final test both use all 32 test images: the last epoch's figures are the final ones
    assert rows[-1]["val_images"] == final["test_images"] == 32
    assert rows[-1]["val_loss"] == final["test_loss"] and rows[-1]["val_acc"] == final["test_acc"]
    assert rows[-1]["val_bn"] == final["bn"] == "BN statistics re-estimated on 2 training batches"
    choice = final["precision_choice"]  # what the start-up probe measured and chose, recorded with every epoch
    assert final["precision"] == choice["precision"] and all(row["precision_choice"] == choice for row in rows)
    assert f"val_acc {rows[0]['val_acc']:.3f} (first 32 test images, BN statistics re-estimated" in output
    assert f"outputs in {tmp_path}/" in output and "precision: amp: false; channels_last: false -> float32/contiguous" in output


def test_convert_and_train_a_stock_model(idx_dir, config, tmp_path, capsys):  # noqa: F811
    args = _cli(config, *_args(idx_dir, tmp_path, "--model", "test_tiny_relu", "--convert", "--epochs", "1",
                               "--beta-weight", "1e-3", "--gamma-weight", "1e-3"))
    code, output = _in_process(capsys, args)
    assert code == 0 and "converted test_tiny_relu to an LCNN" in output and "fully converted" in output, output
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.endswith("log_beta") for k in weights) and any(k.endswith("log_gamma") for k in weights)
    code, output = _in_process(capsys, args + ["--epochs", "2", "--resume"])  # resuming converts again, then loads
    assert code == 0 and "resumed from" in output, output


def test_convert_starts_from_the_initial_checkpoint(idx_dir, config, tmp_path, capsys):  # noqa: F811
    """Issue 24: a trained ReLU model is converted from its weights (``initial_checkpoint``, timm train.py's name)."""
    from safetensors.torch import save_file

    from train_tiny_models import tiny_relu

    source = tiny_relu()
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(1.5).add_(0.1)  # not the seeded initialisation the trainer would build
    save_file(source.state_dict(), str(tmp_path / "source.safetensors"))
    args = _cli(config, *_args(idx_dir, tmp_path / "run", "--model", "test_tiny_relu", "--convert",
                               "--convert-function-preserving", "--initial-checkpoint", str(tmp_path / "source.safetensors"),
                               "--epochs", "1", "--lr", "0", "--weight-decay", "0", "--precise-bn-batches", "0"))
    code, output = _in_process(capsys, args)
    assert code == 0, output
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    for key in ("0.weight", "3.weight", "8.weight"):  # the raw (un-normalised) weights, as saved
        assert torch.equal(weights[key], source.state_dict()[key]), key
    code, output = _in_process(capsys, _cli(config, *_args(idx_dir, tmp_path / "other", "--model", "test_tiny_relu",
                                                           "--initial-checkpoint", str(tmp_path / "missing.pth"))))
    assert code == 2 and "initial_checkpoint" in output and "does not exist" in output, output


def test_initial_checkpoint_in_the_output_folder_follows_an_output_override(tmp_path):
    from lcnn_timm.train.config import load_config

    path = tmp_path / "convert.yaml"
    path.write_text("output: output/train\ninitial_checkpoint: output/train/source/model.safetensors\n")
    assert load_config(str(path)).initial_checkpoint == "output/train/source/model.safetensors"
    assert load_config(str(path), {"output": "/runs"}).initial_checkpoint == "/runs/source/model.safetensors"
    pinned = load_config(str(path), {"output": "/runs", "initial_checkpoint": "/w.pth"})
    assert pinned.initial_checkpoint == "/w.pth"


def test_a_held_run_folder_is_refused_before_torch_in_under_a_second(tmp_path):
    """Issue 31: the lock was taken after torch, the data and the precision probe (a second run into a held folder
    was refused after 134-140 s), and ``--resume`` against a held folder said "nothing to resume"."""
    import os
    import subprocess
    import sys

    from lcnn_timm.train.run_lock import RunLock

    root = Path(__file__).parents[1]
    out = tmp_path / "fashion_mnist_quick"  # the config's experiment, inside --output
    holder = RunLock(out)
    holder.acquire()  # this process plays the live run
    try:
        for extra in ([], ["--resume"]):
            argv = ["train", "--config", "configs/fashion_mnist_quick.yaml", "--output", str(tmp_path), *extra]
            check = ("import sys, time\nfrom lcnn_timm_cli import main\nstart = time.perf_counter()\n"
                     f"code = main({argv!r})\nprint(f'refused after {{time.perf_counter() - start:.3f}} s')\n"
                     "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(code)")
            proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=root, timeout=60,
                                  env={**os.environ, "PYTHONPATH": str(root)})
            output = proc.stdout + proc.stderr
            assert proc.returncode == 2 and f"is in use by another lcnn-timm train (pid {os.getpid()})" in output, output
            assert float(output.split("refused after ")[1].split(" s")[0]) < 1.0, output
    finally:
        holder.release()
    assert [p.name for p in out.iterdir()] == [".lock"]  # the refused runs wrote nothing


def test_the_resume_command_under_torchrun_is_the_launch_as_typed(monkeypatch):
    """Issue 31: the printed resume command was a single-process ``lcnn-timm train ... --resume`` under torchrun."""
    from lcnn_timm.train.cli import _launch, _resume_command

    argv = ["--config", "c.yaml", "--lr", "0.1"]
    assert _resume_command(argv) == "lcnn-timm train --config c.yaml --lr 0.1 --resume"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    typed = ["--standalone", "--nproc_per_node", "2", "-m", "lcnn_timm.cli", "train"]
    # the console script runs as "python /venv/bin/torchrun ...": given back as typed
    assert _launch(argv, ["/venv/bin/python", "/venv/bin/torchrun", *typed, *argv]) == ["torchrun", *typed]
    assert _launch(argv, ["/venv/bin/python", "-m", "lcnn_timm.launch", *typed, *argv]) == [
        "/venv/bin/python", "-m", "lcnn_timm.launch", *typed]
    assert _launch(argv, ["srun", "something"]) == [  # a launcher line that does not end with this command's
        "torchrun", "--nnodes", "2", "--nproc_per_node", "4", "-m", "lcnn_timm.cli", "train"]


def test_a_refused_run_leaves_no_folder_it_created_parents_included(tmp_path):
    """A refused ``--output new/nested/run --resume`` left ``new/nested`` behind (the lock made the parents too): a
    later ``reproduce --configs-dir new/nested`` then found the folder."""
    from lcnn_timm.train.run_lock import RunLock

    lock = RunLock(tmp_path / "new" / "nested" / "run")
    lock.acquire()
    lock.release(discard=True)
    assert list(tmp_path.iterdir()) == []
    kept = RunLock(tmp_path / "new" / "run")
    kept.acquire()
    (tmp_path / "new" / "other").mkdir()  # something else appeared beside it meanwhile: kept, with its parent
    kept.release(discard=True)
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["other"]
