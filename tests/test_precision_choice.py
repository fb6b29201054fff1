"""``amp: auto`` / ``channels_last: auto``: the start-up probe's rules, its measurement, and what a run records."""
import copy
from pathlib import Path

import pytest
import torch
import train_tiny_models

from lcnn_timm.train import precision as precision_module
from lcnn_timm.train.config import load_config
from lcnn_timm.train.precision import PrecisionChoice, choose_precision, has_native_bf16, probe_step_seconds


def _fake_probe(monkeypatch, seconds):
    """Replace the measurement by fixed step times ('<dtype>/<layout>': seconds); record which cells were probed."""
    probed = []

    def fake(model, images, labels, cells, repeats=3):
        probed.extend(cells)
        return {precision_module._cell_name(*cell): seconds[precision_module._cell_name(*cell)] for cell in cells}

    monkeypatch.setattr(precision_module, "probe_step_seconds", fake)
    return probed


BATCH = (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
TIMES = {"float32/contiguous": 1.0, "float32/channels_last": 0.8, "bfloat16/contiguous": 0.85,
         "bfloat16/channels_last": 0.75}


def test_auto_keeps_the_fastest_cell_and_bf16_only_when_clearly_faster(monkeypatch):
    monkeypatch.setattr(precision_module, "has_native_bf16", lambda device: True)
    _fake_probe(monkeypatch, TIMES)
    # bf16/channels_last 0.75 s is not <= 90% of float32's best 0.8 s: float32/channels_last
    choice = choose_precision(None, "bfloat16", None, torch.nn.Identity(), *BATCH)
    assert (choice.precision, choice.channels_last) == (None, True)
    assert "float32/channels_last 800 ms" in choice.reason and choice.measured == TIMES
    _fake_probe(monkeypatch, {**TIMES, "bfloat16/channels_last": 0.7})  # 87.5% of float32: bf16 wins
    assert choose_precision(None, "bfloat16", None, torch.nn.Identity(), *BATCH).precision == "bfloat16"


def test_auto_never_probes_emulated_bf16_and_explicit_keys_are_kept(monkeypatch):
    monkeypatch.setattr(precision_module, "has_native_bf16", lambda device: False)
    probed = _fake_probe(monkeypatch, TIMES)
    choice = choose_precision(None, "bfloat16", None, torch.nn.Identity(), *BATCH)
    assert {p for p, _ in probed} == {None} and choice.precision is None and "lacks native bf16" in choice.reason
    probed.clear()
    choice = choose_precision(True, "float16", False, torch.nn.Identity(), *BATCH)  # nothing left to measure
    assert not probed and (choice.precision, choice.channels_last, choice.measured) == ("float16", False, {})
    choice = choose_precision(True, "bfloat16", None, torch.nn.Identity(), *BATCH)  # amp: true, layout auto
    assert {p for p, _ in probed} == {"bfloat16"} and choice.channels_last is True


def test_probe_measures_every_cell_and_leaves_model_and_rng_alone():
    model = train_tiny_models.tiny_lcnn(1, 3, 8).train()
    before = copy.deepcopy(model.state_dict())
    images, labels = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    rng = torch.get_rng_state()
    cells = [(None, False), (None, True), ("bfloat16", False), ("float16", True)]
    seconds = probe_step_seconds(model, images, labels, cells, repeats=1)
    assert set(seconds) == {"float32/contiguous", "float32/channels_last", "bfloat16/contiguous",
                            "float16/channels_last"}
    assert all(0 < s < 60 for s in seconds.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics, u/v too
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)


def test_choice_round_trips_through_a_checkpoint_dict():
    choice = PrecisionChoice("bfloat16", True, "why", {"bfloat16/channels_last": 0.5})
    assert PrecisionChoice.from_dict(choice.as_dict()) == choice
    assert PrecisionChoice.from_dict(PrecisionChoice(None, False, "r").as_dict()).precision is None


@pytest.mark.parametrize("text, expected", [("auto", None), (True, True), (False, False)])
def test_config_spells_auto_for_both_keys(tmp_path, text, expected):
    cfg = load_config(None, {"amp": text, "channels_last": text})
    assert cfg.amp is expected and cfg.channels_last is expected
    assert load_config(None, {}).channels_last is None and load_config(None, {}).amp is None  # the defaults


@pytest.mark.parametrize("flags, native", [
    ("fpu avx2 fma", False),
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 amx_tile amx_bf16", True),
])
def test_native_bf16_read_from_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert has_native_bf16(torch.device("cpu"), cpuinfo) is native
    assert not has_native_bf16(torch.device("cpu"), Path("/nonexistent/cpuinfo"))
