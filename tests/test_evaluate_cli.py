import copy
import hashlib
import json
import os

import pytest
import safetensors.torch
import timm
import torch
from timm.models import is_model, register_model
from torch import nn

from lcnn_timm.cli import main as lcnn_main
from lcnn_timm.curvature import estimate_curvature
from lcnn_timm.evaluation import create_eval_model, load_eval_data, load_results
from lcnn_timm.evaluation.cli import main
from lcnn_timm.layers import CenteredSoftplus, is_spectral_normalized, operator_norm, refresh_spectral_norms


def tiny_net(act, in_chans=3, num_classes=4, width=4):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), act(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes),
    )
    model.num_classes = num_classes
    model.pretrained_cfg = {"input_size": (in_chans, 8, 8), "mean": (0.5,) * in_chans, "std": (0.25,) * in_chans}
    return model


if not is_model("evaltest_tiny_softplus"):
    @register_model
    def evaltest_tiny_softplus(pretrained=False, num_classes=4, in_chans=3, width=4, **kwargs):
        return tiny_net(lambda: CenteredSoftplus(4.0), in_chans, num_classes, width)

    @register_model
    def evaltest_tiny_relu(pretrained=False, num_classes=4, in_chans=3, **kwargs):
        return tiny_net(nn.ReLU, in_chans, num_classes)


FAST = ["--count", "12", "--batch-size", "6", "--curvature-iterations", "3", "--pgd-steps", "2", "--no-progress"]


def run(tmp_path, *args):
    out = tmp_path / "results.json"
    code = main([*args, "--out", str(out), *FAST])
    return code, (json.loads(out.read_text()) if out.exists() else None)


def test_full_run_writes_self_describing_results(tmp_path, capsys):
    out = tmp_path / "sub" / "results.json"
    code = lcnn_main(["evaluate", "evaltest_tiny_softplus", "--dataset", "synthetic", "--out", str(out), *FAST])
    assert code == 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # like every other output (results.json was 0600)
    results = json.loads(out.read_text())
    assert results["schema_version"] == 2
    assert results["dataset"]["name"] == "synthetic" and results["dataset"]["count"] == 12
    assert results["model"]["name"] == "evaltest_tiny_softplus"
    assert results["model"]["input_normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert {"torch", "timm", "lcnn_timm"} <= set(results["environment"])
    metrics = results["metrics"]
    assert list(metrics) == ["accuracy", "curvature", "pgd", "certified", "gradient_stability"]
    assert not metrics["certified"]["supported"]  # a plain-softplus test model is outside the LCNN theory

    # numbers agree with a direct computation on the same data
    model = create_eval_model("evaltest_tiny_softplus")
    data = load_eval_data("synthetic", count=12, batch_size=12, input_size=(3, 8, 8), num_classes=4)
    x, y = next(iter(data.loader))
    assert metrics["accuracy"]["value"] == pytest.approx(100 * (model(x).argmax(1) == y).float().mean().item())
    direct = estimate_curvature(model, x, y, iterations=3, generator=torch.Generator().manual_seed(0))
    curv = metrics["curvature"]
    assert curv["meaningful"] and curv["iterations"] == 3 and curv["count"] == 12
    assert curv["method"]["name"] == "lanczos" and curv["method"]["steps"] == 3 and curv["iterations_used"]["max"] == 3
    assert curv["gradient_norm"]["mean"] == pytest.approx(direct.gradient_norm.mean().item(), rel=1e-5)
    assert curv["curvature"]["median"] > 0
    assert (tmp_path / "sub" / curv["histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert [r["eps"] for r in metrics["pgd"]] == [0.05, 0.1, 0.15, 0.2]
    for r in metrics["pgd"]:
        assert r["norm"] == "l2" and r["steps"] == 2 and r["step_size"] == pytest.approx(2.5 * r["eps"] / 2)
        assert r["accuracy"] <= metrics["accuracy"]["value"]
    levels = metrics["gradient_stability"]["levels"]
    assert [lv["noise"] for lv in levels] == [1e-3, 1e-2, 1e-1]
    assert levels[0]["mean"] < levels[-1]["mean"]
    assert "L2 sphere" in metrics["gradient_stability"]["noise_distribution"]

    table = capsys.readouterr().out
    assert "clean accuracy" in table and "PGD l2 eps=0.2" in table
    # the table names the estimator results.json records (it said "power iterations")
    assert "3 Lanczos steps" in table and "power iterations" not in table


def test_results_feed_model_cards(tmp_path):
    card = pytest.importorskip("lcnn_timm.hub.card")
    code, results = run(tmp_path, "evaltest_tiny_softplus", "--dataset", "synthetic", "--metrics", "accuracy,curvature,pgd")
    assert code == 0
    names = [m.name for m in card.metrics_from_results(results)]
    assert names[0].startswith("Clean top-1") and len(names) == 1 + 3 + 4
    curvature_protocol = card.metrics_from_results(results)[1].protocol
    assert "3 Lanczos steps (3 HVPs" in curvature_protocol


def test_schema_1_results_stay_readable(tmp_path):
    """Power-iteration results (schema 1) still load and their cards still say how they were measured."""
    card = pytest.importorskip("lcnn_timm.hub.card")
    curvature = {"count": 8, "iterations": 10, "eps": 1e-6, "curvature": {"mean": 2.0, "std": 0.5}}
    path = tmp_path / "results.json"
    for version, method in ((1, "10 Hessian-vector power iterations,"), (2, "10 Lanczos steps (10 HVPs")):
        path.write_text(json.dumps({"schema_version": version, "metrics": {"curvature": curvature}}))
        results = load_results(str(path))
        assert method in card.metrics_from_results(results)[0].protocol
    path.write_text(json.dumps({"schema_version": 3}))
    with pytest.raises(ValueError, match="schema_version 3 is not supported"):
        load_results(str(path))


def test_results_record_the_norm_of_spectrally_normalised_layers(tmp_path):
    """None without such layers; for an LCNN checkpoint whose stored vectors lag its weights, the lag found by
    converging them independently."""
    _, plain = run(tmp_path, "evaltest_tiny_softplus", "--dataset", "synthetic", "--metrics", "accuracy")
    assert plain["model"]["normalized_layer_norm_max"] is None
    kwargs = dict(channels=(4, 4, 4, 4), img_size=8, num_classes=4)
    model = timm.create_model("lcnn_resnet18", **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("parametrizations.weight.original"):  # the raw weights of the normalised layers
                p.add_(0.3 * p.std() * torch.randn_like(p))  # small enough that the stored sigmas stay > 0
    path = tmp_path / "lagging.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    converged = copy.deepcopy(model)
    refresh_spectral_norms(converged)
    pairs = [(operator_norm(a).item(), operator_norm(b).item())
             for a, b in zip(model.modules(), converged.modules()) if is_spectral_normalized(a)]
    assert min(stored for stored, _ in pairs) > 0
    lags = [true / stored for stored, true in pairs]
    code, results = run(tmp_path, "lcnn_resnet18", "--checkpoint", str(path), "--dataset", "synthetic",
                        "--model-kwargs", "channels=[4,4,4,4]", "img_size=8", "num_classes=4", "--metrics", "accuracy")
    assert code == 0
    assert max(lags) > 1.01
    assert results["model"]["normalized_layer_norm_max"] == pytest.approx(max(lags), rel=1e-4)


def test_checkpoint_is_loaded_and_hashed(tmp_path):
    model = timm.create_model("evaltest_tiny_softplus")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    code, results = run(tmp_path, "evaltest_tiny_softplus", "--checkpoint", str(path), "--dataset", "synthetic",
                        "--metrics", "accuracy")
    assert code == 0
    assert results["model"]["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    wrapped = create_eval_model("evaltest_tiny_softplus", checkpoint=str(path))
    x, y = next(iter(load_eval_data("synthetic", count=12, batch_size=12, input_size=(3, 8, 8), num_classes=4).loader))
    assert results["metrics"]["accuracy"]["correct"] == (wrapped(x).argmax(1) == y).sum().item()


def test_mismatched_checkpoint_lists_keys(tmp_path, capsys):
    other = timm.create_model("evaltest_tiny_softplus")
    state = {"extra.weight": torch.zeros(1), **{k: v for k, v in other.state_dict().items() if not k.startswith("5.")}}
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    code, _ = run(tmp_path, "evaltest_tiny_softplus", "--checkpoint", str(path), "--dataset", "synthetic")
    err = capsys.readouterr().err
    assert code == 2
    assert "missing keys: 5.weight, 5.bias" in err and "unexpected keys: extra.weight" in err


def test_wrong_shape_checkpoint_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(timm.create_model("evaltest_tiny_softplus", width=6).state_dict(), str(path))
    code, _ = run(tmp_path, "evaltest_tiny_softplus", "--checkpoint", str(path), "--dataset", "synthetic")
    err = capsys.readouterr().err
    # one line, as lcnn-timm push says it (torch's own message has a line per tensor: ~100 for another ResNet width)
    assert code == 2 and err.count("\n") == 1
    assert "does not match architecture" in err and "7 shape mismatch: 0.weight: (6, 3, 3, 3) there, (4, 3, 3, 3)" in err


@pytest.mark.parametrize("args, expected", [
    (["--metrics", "accuracy,hessian"], "valid metrics: accuracy, curvature, pgd, certified, autoattack, gradient_stability"),
    (["--dataset", "imagenet-ish"], "valid: cifar10, cifar100, fashion_mnist, synthetic"),
    (["--model-kwargs", "num_classes"], "key=value"),
])
def test_bad_input_names_the_valid_options(tmp_path, capsys, args, expected):
    argv = ["evaltest_tiny_softplus"] + ([] if "--dataset" in args else ["--dataset", "synthetic"])
    code, _ = run(tmp_path, *argv, *args)
    assert code == 2 and expected in capsys.readouterr().err


def test_an_existing_folder_as_out_is_a_clear_error_before_any_metric(tmp_path, capsys):
    """--out names the results file: a folder there raised IsADirectoryError after every metric had run."""
    code = main(["evaltest_tiny_softplus", "--dataset", "synthetic", *FAST, "--out", str(tmp_path)])
    assert code == 2 and "is a folder; give a file path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_is_named(tmp_path, capsys):
    code, _ = run(tmp_path, "evaltest_no_such_model", "--dataset", "synthetic")
    assert code == 2 and "unknown timm model" in capsys.readouterr().err


def test_relu_model_reports_curvature_as_not_meaningful(tmp_path, capsys):
    with pytest.warns(UserWarning, match="piecewise-linear"):
        code, results = run(tmp_path, "evaltest_tiny_relu", "--dataset", "synthetic", "--metrics", "curvature")
    assert code == 0
    curv = results["metrics"]["curvature"]
    assert curv["meaningful"] is False and "piecewise-linear" in curv["warning"]
    assert "curvature" not in curv and "hessian_norm" not in curv
    assert "not meaningful" in capsys.readouterr().out
    assert not (tmp_path / "results_curvature_hist.png").exists()


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST IDX files not present")
def test_real_dataset_through_the_data_package(tmp_path, capsys):
    code, results = run(tmp_path, "evaltest_tiny_softplus", "--model-kwargs", "in_chans=1", "num_classes=10",
                        "--dataset", "fashion_mnist:test", "--data-dir", FASHION, "--metrics", "accuracy")
    assert code == 0
    assert results["dataset"] == {**results["dataset"], "name": "fashion_mnist", "split": "test", "count": 12,
                                  "total": 10000}
    assert results["model"]["model_kwargs"] == {"in_chans": 1, "num_classes": 10}
    code, _ = run(tmp_path, "evaltest_tiny_softplus", "--model-kwargs", "in_chans=1",
                  "--dataset", "fashion_mnist", "--data-dir", FASHION, "--metrics", "accuracy")
    assert code == 2 and "num_classes" in capsys.readouterr().err


def test_autoattack_without_its_package_says_what_to_install(tmp_path, capsys):
    try:
        import pyautoattack  # noqa: F401
        pytest.skip("pyautoattack is installed")
    except ImportError:
        pass
    code, _ = run(tmp_path, "evaltest_tiny_softplus", "--dataset", "synthetic", "--metrics", "autoattack")
    assert code == 2 and "pip install pyautoattack" in capsys.readouterr().err


def test_costly_count_limits_derivative_metrics_only(tmp_path):
    code, results = run(tmp_path, "evaltest_tiny_softplus", "--dataset", "synthetic", "--costly-count", "5",
                        "--metrics", "accuracy,curvature,pgd,gradient_stability")
    assert code == 0
    metrics = results["metrics"]
    assert metrics["accuracy"]["count"] == 12 and results["dataset"]["count"] == 12
    assert metrics["curvature"]["count"] == 5 and metrics["gradient_stability"]["count"] == 5
    assert {r["count"] for r in metrics["pgd"]} == {5}
    # measured on the first 5 examples
    model = create_eval_model("evaltest_tiny_softplus")
    x, y = next(iter(load_eval_data("synthetic", count=5, batch_size=5, input_size=(3, 8, 8), num_classes=4).loader))
    direct = estimate_curvature(model, x, y, iterations=3, generator=torch.Generator().manual_seed(0))
    assert metrics["curvature"]["gradient_norm"]["mean"] == pytest.approx(direct.gradient_norm.mean().item(), rel=1e-5)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unknown_model_names_close_matches_or_says_there_are_none(capsys):
    """It printed ``close matches: []`` (issue 25)."""
    assert lcnn_main(["evaluate", "lcnn_resnt18", "--dataset", "synthetic", "--out", "/tmp/unused.json"]) == 2
    assert "close matches: lcnn_resnet18" in capsys.readouterr().err
    assert lcnn_main(["evaluate", "zzqqxx", "--dataset", "synthetic", "--out", "/tmp/unused.json"]) == 2
    err = capsys.readouterr().err
    assert "no registered model has a similar name" in err and "[]" not in err


def test_a_converted_runs_checkpoint_is_evaluated_with_convert(tmp_path, capsys):
    """Issue 24: the checkpoint of a 'convert: true' run only loads into the converted model (reproduce's convert
    row failed with 'unexpected keys'); --convert rebuilds it, and every value comes from the checkpoint."""
    import lcnn_timm

    kwargs = dict(num_classes=4, in_chans=1, img_size=8, channels=[4, 4, 4, 4], act_layer="relu")
    trained, _ = lcnn_timm.convert_model(timm.create_model("cifar_resnet18_025", **kwargs))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)  # not what a fresh conversion would hold
    path = tmp_path / "converted.safetensors"
    safetensors.torch.save_file(trained.state_dict(), str(path))
    model_kwargs = ["--model-kwargs", *[f"{k}={json.dumps(v)}" for k, v in kwargs.items()]]
    code, _ = run(tmp_path, "cifar_resnet18_025", "--checkpoint", str(path), *model_kwargs, "--dataset", "synthetic",
                  "--metrics", "accuracy")
    assert code == 2 and "unexpected keys" in capsys.readouterr().err
    code, results = run(tmp_path, "cifar_resnet18_025", "--checkpoint", str(path), "--convert", *model_kwargs,
                        "--dataset", "synthetic", "--metrics", "accuracy")
    assert code == 0 and results["model"]["converted"] is True
    from lcnn_timm.evaluation.model import create_eval_model

    loaded = create_eval_model("cifar_resnet18_025", str(path), kwargs, convert=True).model
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST IDX files not present")
def test_costly_metrics_default_to_the_zoo_protocols_1000_images(tmp_path):
    """They ran on the whole split (10,000 Fashion-MNIST test images: 35 minutes of curvature on a loaded CPU)."""
    argv = ["evaltest_tiny_softplus", "--model-kwargs", "in_chans=1", "num_classes=10", "--dataset", "fashion_mnist",
            "--data-dir", FASHION, "--count", "1003", "--metrics", "accuracy,pgd", "--pgd-eps", "0.1",
            "--pgd-steps", "1", "--batch-size", "512", "--no-progress", "--out"]
    for extra, costly in (([], 1000), (["--costly-all"], 1003)):
        assert main([*argv, str(tmp_path / "r.json"), *extra]) == 0
        metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
        assert metrics["accuracy"]["count"] == 1003 and metrics["pgd"][0]["count"] == costly


def test_ctrl_c_keeps_the_finished_metrics_and_exits_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C printed a 115-line KeyboardInterrupt traceback."""
    import lcnn_timm.evaluation.cli as cli

    real = cli.run_metric

    def interrupted_at_curvature(name, *args):
        if name == "curvature":
            raise KeyboardInterrupt
        return real(name, *args)

    monkeypatch.setattr(cli, "run_metric", interrupted_at_curvature)
    try:
        code, results = run(tmp_path, "evaltest_tiny_softplus", "--dataset", "synthetic")
    except KeyboardInterrupt:
        code, results = None, None
    err = capsys.readouterr().err
    assert code == 130 and list(results["metrics"]) == ["accuracy"]
    assert err.count("\n") == 1 and "interrupted during curvature" in err and "finished metric(s): accuracy" in err
