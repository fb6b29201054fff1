"""Command-line conventions: instant top-level help and version, help texts without RST markup, and a push
dry run that needs no Hub repository id."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm

from lcnn_timm.hub.cli import main as push_main

ROOT = Path(__file__).parents[1]


def test_top_level_help_and_version_do_not_import_torch():
    code = ("import sys; from lcnn_timm_cli import main; assert main(['--help']) == 0; "
            "assert main(['--version']) == 0; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "lcnn-timm COMMAND" in proc.stdout and "lcnn-timm 0." in proc.stdout


@pytest.mark.parametrize("command", ["train", "evaluate", "push", "reproduce"])
def test_help_texts_have_no_rst_markup(command, capsys):
    from lcnn_timm.cli import main

    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":class:" not in text, text
    if command == "train":
        assert "--resume" in text and "beta_weight=0.0" in text and "recovery_interval=" in text


@pytest.mark.parametrize("argv, code, expected", [
    (["train", "--help"], 0, "beta_weight=0.0"),
    (["train", "--config", "configs/fashion_mnist_quick.yaml", "--print-config"], 0, "model: lcnn_resnet18_025"),
    (["train"], 2, "no --config given"),
    (["train", "--config", "no/such.yaml"], 2, "does not exist"),
    (["train", "--config", "configs/fashion_mnist_quick.yaml", "--wieght-decay", "1"], 2, "did you mean weight_decay"),
    (["train", "--config", "configs/fashion_mnist_quick.yaml", "--lr", "fast"], 2, "'lr' expects float"),
    (["train", "--config", "configs/fashion_mnist_quick.yaml", "--data-dir", "/no/such/folder"], 2,
     "data_dir /no/such/folder does not exist"),
    (["train", "--config", "configs/fashion_mnist_quick.yaml", "--output", "README.md/runs"], 2,
     "is a file, not a folder; choose a writable output"),
    (["train", "--config", "configs/fashion_mnist_quick.yaml", "--output", "no/such/runs", "--resume"], 2,
     "nothing to resume"),
    (["evaluate", "lcnn_resnet18", "--dataset", "synthetic", "--out", "README.md/results.json"], 2,
     "--out README.md/results.json: "),
    (["evaluate", "lcnn_resnet18", "--dataset", "synthetic", "--out", "docs"], 2,
     "is a folder; give a file path, e.g. "),
    (["evaluate", "lcnn_resnet18", "--checkpoint", "no/such.safetensors", "--dataset", "synthetic", "--out", "r.json"],
     2, "--checkpoint no/such.safetensors does not exist"),
    (["push", "no/such.safetensors", "--model", "lcnn_resnet18", "--dry-run", "--out", "out"], 2,
     "checkpoint no/such.safetensors does not exist"),
    (["reproduce", "--configs-dir", "no/such"], 2, "--configs-dir no/such does not exist"),
    (["evaluate", "--help"], 0, "--curvature-iterations"),
    (["push", "--help"], 0, "--dry-run"),
    (["reproduce", "--help"], 0, "--zoo"),
])
def test_help_and_config_errors_answer_without_importing_torch(argv, code, expected):
    """Issue 25: every --help, config and path error took 8-25 s (torch and timm imported first; 'nothing to
    resume' 87 s, after loading the data and building the model)."""
    check = (f"import sys\nfrom lcnn_timm_cli import main\ntry:\n    code = main({argv!r})\n"
             "except SystemExit as exit_:  # argparse's own exit must not skip the check\n    code = exit_.code\n"
             "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'\nsys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == code and expected in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["evaluate", "push", "reproduce"])
def test_stored_help_is_the_parsers_own(command):
    """lcnn_timm_cli/_help.py answers --help without torch; it must say what the parser says (regenerate with
    python -c 'import lcnn_timm_cli; lcnn_timm_cli.regenerate_help()')."""
    from lcnn_timm_cli import render_help
    from lcnn_timm_cli._help import HELP

    assert HELP[command] == render_help(command)


def test_push_dry_run_needs_no_repo_id(tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    model = timm.create_model("lcnn_resnet18_025", num_classes=10, in_chans=1, img_size=28)
    safetensors.torch.save_file(model.state_dict(), str(checkpoint))
    out = tmp_path / "tiny_card"
    shape = ["--num-classes", "10", "--in-chans", "1", "--img-size", "28"]
    assert push_main([str(checkpoint), "--model", "lcnn_resnet18_025", *shape, "--dry-run", "--out", str(out)]) == 0
    assert "placeholder your-org/tiny_card" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["lcnn_timm"]["repo_id"] == "your-org/tiny_card"
    with pytest.raises(SystemExit):  # a real push still needs it
        push_main([str(checkpoint), "--model", "lcnn_resnet18_025", *shape])
    assert "--repo-id ORG/REPO is required" in capsys.readouterr().err


def test_ctrl_c_while_torch_is_imported_exits_130_without_a_traceback(monkeypatch, capsys):
    """A Ctrl-C during the seconds of ``import torch`` printed a KeyboardInterrupt traceback."""
    import lcnn_timm_cli

    real = lcnn_timm_cli.importlib.import_module

    def interrupted_import(name):
        if name == "lcnn_timm.evaluation.cli":
            raise KeyboardInterrupt
        return real(name)

    monkeypatch.setattr(lcnn_timm_cli.importlib, "import_module", interrupted_import)
    try:
        code = lcnn_timm_cli.main(["evaluate", "lcnn_resnet18", "--dataset", "synthetic", "--out", "/tmp/unused.json"])
    except KeyboardInterrupt:
        code = None
    assert code == 130
    assert capsys.readouterr().err == "lcnn-timm evaluate: interrupted before it started; nothing was written\n"
