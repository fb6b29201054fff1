"""Two-process torchrun (gloo, CPU): every rank ends with identical weights and buffers; one recipe at any world
size, recorded; resume, Ctrl-C and the launch command (issue 31)."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_trainer import _args, _run, assert_same_final_weights, idx_dir, reference_run  # noqa: F401

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


def _torchrun(args, launcher=("torch.distributed.run",), env=None, **kwargs):
    """``args`` under a 2-process torchrun (or ``launcher``), through ``lcnn-timm train``'s entry point."""
    path = os.pathsep.join(filter(None, [str(RUNNER.parents[1]), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", *launcher, "--standalone", "--nproc_per_node", "2", str(RUNNER), "--cli", *args]
    return subprocess.Popen(command, env={**os.environ, "PYTHONPATH": path, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text("plot: false\n")
    return str(path)


@pytest.fixture(scope="module")
def ddp_run(idx_dir, tiny_config, tmp_path_factory):  # noqa: F811
    """An uninterrupted 2-process run of the trainer tests' recipe (do not modify its folder): (folder, output)."""
    out = tmp_path_factory.mktemp("ddp")
    output, _ = (proc := _torchrun(["--config", tiny_config, *_args(idx_dir, out)])).communicate(timeout=300)
    assert proc.returncode == 0, output
    return out, output


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_follow_the_single_process_recipe_and_record_it(ddp_run, reference_run):  # noqa: F811
    """Issue 31: batch_size is the global batch: 2 processes take 8 examples each per step, the single process's
    18 optimiser steps at its learning rates (they took 9 steps of 2 x 16), and the run folder says so."""
    out, output = ddp_run
    assert json.loads((out / "last.json").read_text())["step"] == json.loads(
        (reference_run / "last.json").read_text())["step"] == 18
    assert [row["lr"] for row in _rows(out)] == [row["lr"] for row in _rows(reference_run)]
    layout = {"world_size": 2, "nnodes": 1, "global_batch": 16, "per_process_batch": 8, "threads": 1}
    assert all(row["layout"] == layout for row in _rows(out))
    assert json.loads((out / "final_eval.json").read_text())["layout"] == layout
    config = json.loads((out / "config.json").read_text())
    assert config["layout"] == layout and config["precision_choice"]["precision"] == "float32"
    assert "layout: 2 processes, global batch 16 = 2 x 8 per process, 1 thread per process" in output
    assert output.count("done: ") == output.count("outputs in ") == 1, output  # rank 0 speaks for the run


def test_resume_at_another_world_size_is_refused_unless_allowed(ddp_run, tiny_config, idx_dir, tmp_path):  # noqa: F811
    """Issue 31: a 2-process run resumed by one process silently continued as another run (global batch halved)."""
    out = tmp_path / "run"
    shutil.copytree(ddp_run[0], out)
    args = ["--config", tiny_config, *_args(idx_dir, out, "--resume")]
    output, _ = (proc := _run(["--cli", *args])).communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in output, output
    assert "trained by 2 process(es) (global batch 16); this launch has 1" in output, output
    assert "allow_world_size_change" in output and "resumed from" not in output, output
    output, _ = (proc := _run(["--cli", *args, "--allow-world-size-change"])).communicate(timeout=120)
    assert proc.returncode == 0 and "resume: world size 2 -> 1 (allow_world_size_change); global batch 16 kept" \
        in output, output
    final = json.loads((out / "final_eval.json").read_text())
    assert final["layout"]["per_process_batch"] == 16  # the global batch, kept
    assert [(entry["step"], entry["world_size"]) for entry in final["layout_history"]] == [(0, 2), (18, 1)]


def test_ctrl_c_under_torchrun_stops_once_and_prints_the_torchrun_command_that_resumes(
        ddp_run, tiny_config, idx_dir, tmp_path):  # noqa: F811
    """Issue 31: Ctrl-C (SIGINT to the launcher's whole process group, as a terminal sends it; torchrun forwards a
    second one) ended with torchrun's traceback and exit 1, two messages (rank 1: "no checkpoint had been written
    yet"), and a single-process resume command that continued the run as another one."""
    out = tmp_path / "run"
    args = ["--config", tiny_config, *_args(idx_dir, out, "--recovery-interval", "0")]
    victim = _torchrun(args, launcher=("lcnn_timm.launch",), env={"LCNN_TEST_STEP_DELAY": "0.3"},
                       start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "last.json").is_file():  # the end-of-epoch-0 checkpoint
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGINT)
    output, _ = victim.communicate(timeout=120)
    assert victim.returncode == 130 and "Traceback" not in output, output
    messages = [line for line in output.splitlines() if line.startswith("lcnn-timm train:")]
    step = json.loads((out / "last.json").read_text())["step"]
    assert len(messages) == 1 and f"(step {step}); checkpoint: {out}/ckpt-{step:09d}.safetensors" in messages[0], \
        output
    command = shlex.split(output.split("resume with:\n")[1].splitlines()[0])
    assert command[:3] == [sys.executable, "-m", "lcnn_timm.launch"] and command[-1] == "--resume", command
    assert command[3:] == ["--standalone", "--nproc_per_node", "2", str(RUNNER), "--cli", *args, "--resume"]
    path = os.pathsep.join(filter(None, [str(RUNNER.parents[1]), os.environ.get("PYTHONPATH")]))
    resumed = subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr
    assert_same_final_weights(ddp_run[0], out)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_checkpoint_and_resume(ddp_run, tiny_config, idx_dir, tmp_path):  # noqa: F811
    """Issue 31, item 4: two local "nodes" (one launcher each, c10d rendezvous) are stopped by Ctrl-C, each resumed
    with the command rank 0 printed, and end with the weights of two processes on one node."""
    out = tmp_path / "run"
    args = ["--config", tiny_config, *_args(idx_dir, out, "--recovery-interval", "0")]
    launcher = ("lcnn_timm.launch", "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                f"127.0.0.1:{_free_port()}", "--rdzv_id", "issue31")
    path = os.pathsep.join(filter(None, [str(RUNNER.parents[1]), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", *launcher, "--nproc_per_node", "1", str(RUNNER), "--cli", *args]

    def node(extra=(), **kwargs):
        return subprocess.Popen([*command, *extra], env={**os.environ, "PYTHONPATH": path, **kwargs.pop("env", {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)

    nodes = [node(env={"LCNN_TEST_STEP_DELAY": "0.3"}, start_new_session=True) for _ in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "last.json").is_file():
        time.sleep(0.05)
    time.sleep(0.5)
    for proc in nodes:
        os.killpg(proc.pid, signal.SIGINT)
    outputs = [proc.communicate(timeout=120)[0] for proc in nodes]
    assert [proc.returncode for proc in nodes] == [130, 130], outputs
    text = "".join(outputs)
    assert "Traceback" not in text and text.count("lcnn-timm train: interrupted by SIGINT") == 1, text
    printed = text.split("resume with (the same command on each of the 2 nodes):\n")[1].splitlines()[0]
    assert shlex.split(printed) == [*command, "--resume"], printed
    layout = json.loads((out / "config.json").read_text())["layout"]
    assert layout["world_size"] == layout["nnodes"] == 2 and layout["per_process_batch"] == 8
    resumed = [node(["--resume"]) for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in resumed]
    assert [proc.returncode for proc in resumed] == [0, 0] and "resumed from" in "".join(outputs), outputs
    assert_same_final_weights(ddp_run[0], out)
