"""Issue 36: oneDNN's AVX2 kernels crash in the backward of a channels_last strided 1x1 conv with few input channels.

The guard (``channels_last_hazard``) keeps the probe and the trainer out of channels_last there. Its decision is
tested on made-up CPU flags and environments; the crash itself in a subprocess, so the day torch fixes it the
reproducer test is skipped and says the guard can go.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from test_train_trainer import _args, idx_dir  # noqa: F401  (fixture)

import lcnn_timm  # noqa: F401  (registers the LCNN models)
from lcnn_timm.train import precision as precision_module
from lcnn_timm.train.config import load_config, parse_overrides
from lcnn_timm.train.precision import (PrecisionChoice, channels_last_hazard, choose_precision, crash_prone_convs,
                                       onednn_avx2_reason, without_crashing_layout)

AVX2 = "fpu sse4_1 avx avx2 fma"
AVX512 = f"{AVX2} avx512f avx512dq avx512cd avx512bw avx512vl"
CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # oneDNN's AVX2 kernels also on an AVX-512 CPU


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / f"cpuinfo_{len(flags)}"
    path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return path


@pytest.mark.parametrize("flags, environ, reason", [
    (AVX2, {}, "AVX2 CPU without AVX-512"),
    (AVX512, {}, None),
    (AVX512, CAP, "ONEDNN_MAX_CPU_ISA=AVX2"),
    (AVX512, {"DNNL_MAX_CPU_ISA": "avx2_vnni"}, "DNNL_MAX_CPU_ISA=avx2_vnni"),  # oneDNN reads either, any case
    (AVX512, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "DNNL_MAX_CPU_ISA": "AVX2"}, None),  # ONEDNN_ wins
    (AVX2, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "AVX2 CPU without AVX-512"),  # a cap cannot raise the ISA
    (AVX2, {"ONEDNN_MAX_CPU_ISA": "AVX"}, None),  # AVX and SSE4.1 kernels did not crash
    (f"{AVX2} avx512f avx512cd", {}, "AVX2 CPU without AVX-512"),  # avx512_core needs bw, vl and dq too
    ("fpu sse4_1 avx", {}, None),  # no AVX2 kernels at all
])
def test_which_cpus_and_isa_caps_run_the_avx2_kernels(tmp_path, flags, environ, reason):
    assert onednn_avx2_reason(_cpuinfo(tmp_path, flags), environ) == reason


def test_no_cpu_flags_means_no_guard():
    assert onednn_avx2_reason(Path("/nonexistent/cpuinfo"), {}) is None


@pytest.mark.parametrize("conv, prone", [
    (nn.Conv2d(4, 4, 1, 2), True),
    (nn.Conv2d(7, 16, 1, (2, 1)), True),
    (nn.Conv2d(8, 4, 1, 2), False),  # 8 input channels fill an AVX2 register
    (nn.Conv2d(4, 4, 1, 1), False),
    (nn.Conv2d(4, 4, 3, 2), False),
])
def test_which_convolutions_are_crash_prone(conv, prone):
    assert crash_prone_convs(nn.Sequential(nn.Identity(), conv)) == (["1"] if prone else [])


def test_which_models_are_crash_prone():
    """The test-size ResNet-18 (4 channels: every downsampling shortcut) is; the shipped quarter width is not."""
    tiny = timm.create_model("lcnn_resnet18", img_size=8, channels=[4, 4, 4, 4])
    assert crash_prone_convs(tiny) == [f"stages.{i}.0.shortcut.conv" for i in (1, 2, 3)]
    assert crash_prone_convs(timm.create_model("lcnn_resnet18_025", img_size=8)) == []


def test_hazard_needs_the_cpu_the_isa_and_the_layer(tmp_path):
    prone, safe = nn.Conv2d(4, 4, 1, 2), nn.Conv2d(8, 8, 1, 2)
    cpu, avx2, avx512 = torch.device("cpu"), _cpuinfo(tmp_path, AVX2), _cpuinfo(tmp_path, AVX512)
    hazard = channels_last_hazard(prone, cpu, avx2, {})
    assert hazard.startswith("channels_last skipped:") and "AVX2 CPU without AVX-512" in hazard and "\n" not in hazard
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in channels_last_hazard(prone, cpu, avx512, CAP)
    assert channels_last_hazard(prone, cpu, avx512, {}) is None
    assert channels_last_hazard(safe, cpu, avx2, {}) is None
    assert channels_last_hazard(prone, torch.device("meta"), avx2, {}) is None  # not oneDNN


BATCH = (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))


@pytest.fixture()
def avx2_machine(monkeypatch):
    """Pretend oneDNN runs its AVX2 kernels here; record the cells a probe times."""
    monkeypatch.setattr(precision_module, "onednn_avx2_reason", lambda cpuinfo, environ: "test AVX2")
    probed = []

    def fake_probe(model, images, labels, cells, repeats=3):
        probed.extend(cells)
        return {precision_module._cell_name(*cell): 1.0 for cell in cells}

    monkeypatch.setattr(precision_module, "probe_step_seconds", fake_probe)
    return probed


def test_probe_never_times_channels_last_where_it_would_crash(avx2_machine):
    prone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1, 2), nn.Flatten())
    choice = choose_precision(False, "bfloat16", None, prone, *BATCH)  # auto: contiguous is all that is left
    assert not choice.channels_last and not avx2_machine
    assert "channels_last: auto, channels_last skipped" in choice.reason and "first '1'" in choice.reason
    choice = choose_precision(False, "bfloat16", True, prone, *BATCH)  # even when asked for
    assert not choice.channels_last and "channels_last: true, channels_last skipped" in choice.reason
    choose_precision(False, "bfloat16", None, nn.Conv2d(1, 8, 1, 2), *BATCH)  # 1 channel in: also prone
    assert not avx2_machine
    choice = choose_precision(False, "bfloat16", None, nn.Conv2d(8, 8, 1, 2), torch.zeros(4, 8, 8, 8), BATCH[1])
    assert {c for _, c in avx2_machine} == {False, True} and "skipped" not in choice.reason


def test_a_resumed_channels_last_run_goes_contiguous_where_it_would_crash(avx2_machine):
    resumed = PrecisionChoice(None, True, "probed elsewhere", {"float32/channels_last": 0.5})
    moved = without_crashing_layout(resumed, nn.Conv2d(4, 4, 1, 2), torch.device("cpu"))
    assert not moved.channels_last and moved.reason.startswith("probed elsewhere; channels_last skipped:")
    assert moved.measured == resumed.measured
    assert without_crashing_layout(resumed, nn.Conv2d(8, 8, 1, 2), torch.device("cpu")) == resumed


def test_the_trainer_trains_and_resumes_contiguous_where_channels_last_would_crash(monkeypatch, idx_dir, tmp_path,
                                                                                   capsys):
    """Built, not trained: the layout is set before any step, so a wrong one cannot crash this test."""
    from lcnn_timm.train.trainer import Trainer

    args = [*_args(idx_dir, tmp_path / "run"), "--model", "lcnn_resnet18", "--channels-last", "true",
            "--model-kwargs", "{img_size: 8, channels: [4, 4, 4, 4]}"]
    monkeypatch.setattr(precision_module, "onednn_avx2_reason", lambda cpuinfo, environ: None)
    trainer = Trainer(load_config(None, parse_overrides(args)))  # a machine without the crash: as asked
    assert trainer.channels_last and next(trainer.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    trainer.out_dir.mkdir(parents=True, exist_ok=True)  # the trainer may have made it (config.json at start)
    trainer.save()
    trainer.lock.release()  # the next trainer of this folder takes it (each holds the run folder's lock)
    monkeypatch.setattr(precision_module, "onednn_avx2_reason", lambda cpuinfo, environ: "test AVX2")
    for extra in ([], ["--resume"]):  # a new run, and the channels_last run resumed here
        capsys.readouterr()
        trainer = Trainer(load_config(None, parse_overrides([*args, *extra])))
        assert not trainer.channels_last and trainer.train_loader.channels_last is False
        assert all(p.is_contiguous() for p in trainer.model.parameters())
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("precision:"))
        assert "channels_last skipped" in line and "test AVX2" in line and "stages.1.0.shortcut.conv" in line
        assert trainer.choice.as_dict()["reason"] == line.removeprefix("precision: ")
        trainer.lock.release()


REPRODUCER = """
import torch, torch.nn as nn
conv = nn.Conv2d({channels}, {channels}, {kernel}, {stride}, bias=False).to(memory_format=torch.channels_last)
x = torch.randn(8, {channels}, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
for _ in range(3):  # the heap corruption does not always surface on the first step
    conv(x).sum().backward()
"""


def _crashes(channels: int, kernel: int, stride: int) -> bool:
    """Whether the reproducer dies (or hangs) in a fresh interpreter under oneDNN's AVX2 kernels, one thread (a
    segfault or heap abort there; with two threads it hung)."""
    env = {**os.environ, **CAP, "OMP_NUM_THREADS": "1"}
    code = REPRODUCER.format(channels=channels, kernel=kernel, stride=stride)
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120).returncode != 0
    except subprocess.TimeoutExpired:
        return True


@pytest.fixture()
def avx2_kernels():
    if onednn_avx2_reason(environ=CAP) is None:
        pytest.skip("this CPU has no AVX2: oneDNN's AVX2 kernels cannot run here")


def test_the_guarded_geometry_still_crashes(avx2_kernels):
    """The reproducer of docs/training.md (issue 36). Skipped once torch no longer crashes: then retire the guard."""
    if not _crashes(4, 1, 2):
        pytest.skip(f"torch {torch.__version__} no longer crashes: retire channels_last_hazard (issue 36)")
    assert channels_last_hazard(nn.Conv2d(4, 4, 1, 2), torch.device("cpu"), environ=CAP) is not None


@pytest.mark.parametrize("channels, kernel, stride", [(8, 1, 2), (4, 1, 1), (4, 3, 2)])
def test_what_the_guard_lets_through_does_not_crash(avx2_kernels, channels, kernel, stride):
    assert channels_last_hazard(nn.Conv2d(channels, channels, kernel, stride), torch.device("cpu"), environ=CAP) is None
    assert not _crashes(channels, kernel, stride)
