"""``lcnn-timm reproduce`` end to end on a tiny synthetic dataset in CIFAR-100's Parquet layout."""
import io
import json
import shlex
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from lcnn_timm.cli import main as lcnn_main
from lcnn_timm.zoo import ROWS, ZOOS

PAPER_ROWS = [row for row in ROWS if row.paper]  # what reproduce runs by default

# 8 channels: 4 put the downsampling shortcuts (strided 1x1 convs) in the geometry whose channels_last backward
# crashes oneDNN's AVX2 kernels (issue 36; the trainer would avoid it, but this test is not about that guard)
TINY = {"epochs": "1", "batch_size": "8", "train_num_samples": "16", "val_num_samples": "8", "precise_bn_batches": "1",
        "model_kwargs": "{img_size: 32, channels: [8, 8, 8, 8]}"}


def _write_cifar100(root, split, count, seed):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for array in rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    labels = rng.integers(0, 100, count).tolist()
    table = pa.table({"img": images, "fine_label": labels, "coarse_label": [lb // 5 for lb in labels]})
    (root / "cifar100").mkdir(exist_ok=True)
    pq.write_table(table, root / "cifar100" / f"{split}-00000-of-00001.parquet")


@pytest.fixture()
def reproduce_args(tmp_path):
    (tmp_path / "data").mkdir()
    _write_cifar100(tmp_path / "data", "train", 16, seed=0)
    _write_cifar100(tmp_path / "data", "test", 8, seed=1)
    overrides = [arg for key, value in {**TINY, "output": str(tmp_path / "runs")}.items()
                 for arg in ("--set", f"{key}={value}")]
    return tmp_path, ["reproduce", "--zoo", "cifar100", "--data-dir", str(tmp_path / "data"), *overrides,
                      "--results-dir", str(tmp_path / "results"), "--hub-cards-dir", str(tmp_path / "hub_cards"),
                      "--costly-count", "4", "--curvature-iterations", "2", "--pgd-steps", "1", "--device", "cpu"]


def test_reproduce_trains_evaluates_and_stages_every_row(reproduce_args, monkeypatch, capsys):
    tmp_path, argv = reproduce_args
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    uploads = []

    def create_repo(api, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(api, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert lcnn_main([*argv, "--push", "--hub-org", "test-org"]) == 0

    results = tmp_path / "results"
    summary = json.loads((results / "summary.json").read_text())
    assert [row["row"] for row in summary["rows"]] == [row.key for row in PAPER_ROWS]
    for row in summary["rows"]:
        metrics = json.loads((results / row["results"]).read_text())["metrics"]
        assert metrics["accuracy"]["count"] == 8 and metrics["curvature"]["count"] == 4
        assert [r["eps"] for r in metrics["pgd"]] == [0.05, 0.1, 0.15, 0.2]
        per_example = json.loads((results / row["row"] / "results_curvature.json").read_text())["curvature"]
        assert len(per_example) == 4
        assert np.mean(per_example) == pytest.approx(metrics["curvature"]["curvature"]["mean"], rel=1e-9)
        assert row["train_seconds"] > 0
    table = (results / "table.md").read_text()
    assert table.count("\n") == 2 + len(PAPER_ROWS) and "| LCNN + GradReg |" in table and "| 1.00x" in table
    assert (results / "curvature_vs_robustness.png").read_bytes()[:4] == b"\x89PNG"

    # the two LCNN rows are staged in timm's layout and uploaded; their weights are the trained ones
    assert [repo for repo, _ in uploads] == ["test-org/lcnn_resnet18.cifar100", "test-org/lcnn_resnet18.cifar100_gradreg"]
    assert all({"README.md", "config.json", "model.safetensors", "results.json", "train.yaml"} <= set(files)
               for _, files in uploads)
    staged = tmp_path / "hub_cards" / "lcnn_resnet18.cifar100"
    model = timm.create_model(f"local-dir:{staged}", pretrained=True).eval()
    trained = safetensors.torch.load_file(str(tmp_path / "runs" / "cifar100_lcnn" / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert json.loads((staged / "results.json").read_text()) == json.loads((results / "lcnn" / "results.json").read_text())

    # a second run finds every step done: nothing is retrained or re-evaluated
    capsys.readouterr()
    assert lcnn_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == len(PAPER_ROWS) and "evaluating" not in out


def test_reproduce_rejects_unknown_rows_and_push_without_token(reproduce_args, monkeypatch, capsys):
    tmp_path, argv = reproduce_args
    assert lcnn_main([*argv, "--rows", "standard,bogus"]) == 2
    assert "unknown row(s) ['bogus']" in capsys.readouterr().err
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert lcnn_main([*argv, "--push"]) == 2
    assert "hf auth login" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # stopped before training anything


def test_the_conversion_row_loads_the_relu_rows_weights():
    """``--rows relu,convert``: the convert config's initial_checkpoint is where the relu row saves its model, also
    when reproduce's --set moves the output folder."""
    from lcnn_timm.train.config import load_config
    from lcnn_timm.train.paths import output_dir

    root = Path(__file__).resolve().parents[1] / "configs"
    for overrides in ({}, {"output": "/elsewhere"}):
        relu = load_config(str(root / "fashion_mnist_relu.yaml"), overrides)
        convert = load_config(str(root / "fashion_mnist_convert.yaml"), overrides)
        assert Path(convert.initial_checkpoint) == output_dir(relu) / "model.safetensors"
        assert convert.convert and convert.convert_function_preserving and convert.model == relu.model
        assert convert.model_kwargs == relu.model_kwargs and relu.model_kwargs["act_layer"] == "relu"


def test_a_subset_of_rows_adds_to_the_earlier_table(reproduce_args):
    """Running --rows standard after --rows lcnn keeps the LCNN row in summary.json and table.md (a subset used to
    replace them)."""
    tmp_path, argv = reproduce_args
    assert lcnn_main([*argv, "--rows", "lcnn"]) == 0
    assert lcnn_main([*argv, "--rows", "standard"]) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert [row["row"] for row in summary["rows"]] == ["standard", "lcnn"]  # in the table's order
    table = (tmp_path / "results" / "table.md").read_text()
    assert "| Standard |" in table and "| LCNN |" in table


def test_by_default_nothing_is_written_into_the_checked_in_hub_cards(reproduce_args, monkeypatch):
    """The defaults wrote into hub_cards/results/<zoo> and hub_cards/, mixing a new run's rows with the published
    ones; that now takes --publish."""
    tmp_path, argv = reproduce_args
    argv = argv[:argv.index("--results-dir")] + argv[argv.index("--hub-cards-dir") + 2:]
    monkeypatch.chdir(tmp_path)
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    assert lcnn_main([*argv, "--configs-dir", configs, "--rows", "lcnn"]) == 0
    assert (tmp_path / "output" / "reproduce" / "cifar100" / "lcnn" / "results.json").is_file()
    assert (tmp_path / "output" / "reproduce" / "hub_cards" / "lcnn_resnet18.cifar100" / "model.safetensors").is_file()
    assert not (tmp_path / "hub_cards").exists()
    # --publish names the checked-in folders (a second real run would cost another evaluation)
    from lcnn_timm.zoo import _output_dirs, _parser

    publish = _parser().parse_args(["--publish"])
    assert _output_dirs(publish, ZOOS["cifar100"]) == (Path("hub_cards/results/cifar100"), Path("hub_cards"))


@pytest.mark.parametrize("stop", ["train returns 130", "KeyboardInterrupt"])
def test_ctrl_c_exits_130_and_prints_the_command_that_resumes(reproduce_args, monkeypatch, capsys, stop):
    """Ctrl-C was reported as 'training ... failed; fix it', exit 2. The trainer saves a checkpoint and returns 130;
    a Ctrl-C outside its handler reaches reproduce as KeyboardInterrupt."""
    import lcnn_timm.train.cli

    tmp_path, argv = reproduce_args

    def interrupted_training(train_argv):
        if stop == "KeyboardInterrupt":
            raise KeyboardInterrupt
        return 130

    monkeypatch.setattr(lcnn_timm.train.cli, "main", interrupted_training)
    try:
        code = lcnn_main([*argv, "--rows", "lcnn"])
    except KeyboardInterrupt:
        code = None
    err = capsys.readouterr().err
    assert code == 130 and "failed" not in err
    assert err.endswith(f"resume with:\n  {shlex.join(['lcnn-timm', *argv, '--rows', 'lcnn'])}\n")
