"""Registry models: timm interface, checkpoint round trips, fx, bound, freeze."""
import pytest
import timm
import torch
import torch.fx
from safetensors.torch import save_file
from timm.optim import param_groups_weight_decay

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.curvature import UnsupportedStructureError, curvature_proxy
from lcnn_timm.export import freeze
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm2d, HalvesResidual, is_spectral_normalized
from lcnn_timm.models._pretrained import CIFAR100_LABEL_NAMES

LCNN = ["lcnn_lipcnn", "lcnn_resnet18", "lcnn_resnet18_025", "lcnn_resnet34", "lcnn_vgg11"]
STANDARD = ["cifar_resnet18", "cifar_resnet18_025", "cifar_resnet34", "cifar_vgg11"]
SMALL = dict(img_size=16, num_classes=5)


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return timm.create_model("lcnn_resnet18", **SMALL)


def _trained_stats(model, size=16, channels=3):
    """Give BatchNorms non-trivial running statistics and activate some gamma clips."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, channels, size, size) * 3)
        for module in model.modules():
            if isinstance(module, GammaBatchNorm2d):
                module.log_gamma.fill_(-0.3)
    return model.eval()


def test_registered_names():
    assert timm.list_models("lcnn_*") == sorted(LCNN)
    assert set(STANDARD) <= set(timm.list_models("cifar_*"))
    # only the staged Fashion-MNIST LCNNs have weights
    assert timm.list_models("lcnn_*", pretrained=True) == [
        "lcnn_lipcnn.fmnist", "lcnn_resnet18_025.fmnist", "lcnn_resnet18_025.fmnist_gradreg"]
    assert "lcnn_resnet18.cifar100_gradreg" in timm.list_models("lcnn_resnet18*", include_tags=True)


def test_reference_layers_and_parameter_count():
    """ResNet-18 LCNN for CIFAR-100 has the reference's 11,210,569 parameters (spec 7.14)."""
    model = timm.create_model("lcnn_resnet18")
    assert sum(p.numel() for p in model.parameters()) == 11_210_569
    acts = [m for m in model.modules() if isinstance(m, CenteredSoftplus)]
    assert len(acts) == 17 and len({id(a) for a in acts}) == 17
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(is_spectral_normalized(c) and c.bias is None for c in convs)
    assert is_spectral_normalized(model.fc)
    standard = timm.create_model("cifar_resnet18")
    assert not any(isinstance(m, (CenteredSoftplus, GammaBatchNorm2d)) for m in standard.modules())
    assert is_spectral_normalized(standard.fc) and not is_spectral_normalized(standard.stem.conv)
    assert isinstance(standard.stem.act, torch.nn.Softplus) and standard.stem.act.beta == 1000.0


@pytest.mark.parametrize("name", LCNN + STANDARD)
def test_forward_backward_and_fx(name):
    model = timm.create_model(name, **SMALL)
    x = torch.rand(2, model.in_chans, 16, 16, requires_grad=True)  # the _025 zoo models default to 1 channel
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", LCNN)
def test_proxy_finite_on_lcnn(name):
    assert 0 < curvature_proxy(timm.create_model(name, **SMALL)) < float("inf")


@pytest.mark.parametrize("name", STANDARD)
def test_proxy_refuses_standard(name):
    with pytest.raises(UnsupportedStructureError):
        curvature_proxy(timm.create_model(name, **SMALL))


def test_vgg_reference_pooling_is_outside_the_theory():
    model = timm.create_model("lcnn_vgg11", downsample="max", **SMALL)
    with pytest.raises(UnsupportedStructureError, match="MaxPool2d"):
        curvature_proxy(model)


@pytest.mark.parametrize("name, channels, reductions", [
    ("lcnn_resnet18", [64, 64, 128, 256, 512], [1, 1, 2, 4, 8]),
    ("lcnn_vgg11", [64, 128, 256, 512, 512], [1, 2, 4, 8, 16]),
])
def test_features_only(name, channels, reductions):
    model = timm.create_model(name, features_only=True, img_size=16)
    assert model.feature_info.channels() == channels and model.feature_info.reduction() == reductions
    features = model(torch.rand(2, 3, 16, 16))
    assert [f.shape[1] for f in features] == channels
    assert [16 // f.shape[-1] for f in features] == reductions


def test_reset_classifier_keeps_spectral_norm(resnet18):
    model = timm.create_model("lcnn_resnet18", **SMALL)
    model.reset_classifier(7)
    assert model.num_classes == 7 and is_spectral_normalized(model.get_classifier())
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 7)
    sigma = torch.linalg.matrix_norm(model.fc.weight.detach(), ord=2)
    torch.testing.assert_close(sigma, torch.tensor(1.0), rtol=1e-3, atol=0)
    model.reset_classifier(0)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 512)
    standard = timm.create_model("cifar_vgg11", **SMALL)
    standard.reset_classifier(3, global_pool="avg")
    assert not is_spectral_normalized(standard.fc) and standard.fc.in_features == 512
    assert standard(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_no_weight_decay_is_all_curvature_parameters(resnet18):
    names = resnet18.no_weight_decay()
    expected = {n for n, _ in resnet18.named_parameters() if n.endswith(("log_beta", "log_gamma"))}
    assert names == expected and len(names) == 17 + 20
    assert timm.create_model("cifar_resnet18", **SMALL).no_weight_decay() == set()
    groups = param_groups_weight_decay(resnet18, 5e-4, resnet18.no_weight_decay())
    decayed = {id(p) for p in groups[1]["params"]}
    assert not any(id(p) in decayed for n, p in resnet18.named_parameters() if n in names)


def test_group_matcher_and_grad_checkpointing(resnet18):
    groups = timm.models.group_parameters(resnet18, resnet18.group_matcher(coarse=True))
    assert len(groups) == 1 + 4 + 1  # stem, 4 stages, head
    model = timm.create_model("lcnn_resnet18", **SMALL)
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    expected = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("name", ["lcnn_resnet18", "lcnn_vgg11", "cifar_resnet18"])
def test_safetensors_round_trip(name, tmp_path):
    model = _trained_stats(timm.create_model(name, **SMALL))
    path = str(tmp_path / "model.safetensors")
    save_file(model.state_dict(), path)
    x = torch.rand(3, 3, 16, 16)
    expected = model(x)
    overlay = dict(file=path, num_classes=5)  # the cfg describes the file's head
    for kwargs in (dict(checkpoint_path=path), dict(pretrained=True, pretrained_cfg_overlay=overlay)):
        torch.manual_seed(1)  # a different random init, overwritten by the load
        loaded = timm.create_model(name, **SMALL, **kwargs).eval()
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_pretrained_new_num_classes_drops_only_the_head(tmp_path):
    model = _trained_stats(timm.create_model("lcnn_resnet18", img_size=16))
    path = str(tmp_path / "model.safetensors")
    save_file(model.state_dict(), path)
    tuned = timm.create_model("lcnn_resnet18", img_size=16, num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(tuned.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    assert tuned(x).shape == (2, 3)


@pytest.mark.parametrize("name", ["lcnn_resnet18.cifar100", "lcnn_vgg11.fmnist_gradreg", "cifar_resnet34.cifar100"])
def test_unpublished_tag_gives_timms_error(name):
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):
        timm.create_model(name, pretrained=True)


def test_pretrained_cfgs():
    cfg = timm.get_pretrained_cfg("lcnn_resnet18.cifar100_gradreg").to_dict()
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 100
    assert cfg["mean"] == (0.0, 0.0, 0.0) and cfg["std"] == (1.0, 1.0, 1.0)  # [0, 1] pixels, as in the paper
    assert cfg["label_names"] == CIFAR100_LABEL_NAMES and len(set(CIFAR100_LABEL_NAMES)) == 100
    assert list(CIFAR100_LABEL_NAMES) == sorted(CIFAR100_LABEL_NAMES)  # the dataset's fine labels are alphabetical
    assert cfg["paper_ids"] == "arXiv:2206.07144" and "hf_hub_id" not in cfg
    fmnist = timm.get_pretrained_cfg("lcnn_resnet18.fmnist").to_dict()
    assert fmnist["input_size"] == (1, 28, 28) and fmnist["num_classes"] == 10 and len(fmnist["label_names"]) == 10


def test_fashion_mnist_shape_from_tag_and_args():
    model = timm.create_model("lcnn_resnet18.fmnist")
    assert (model.in_chans, model.img_size, model.num_classes) == (1, (28, 28), 10)
    assert model.stem.conv.parametrizations.weight[0].operator.input_size == (28, 28)
    vgg = timm.create_model("lcnn_vgg11", in_chans=1, img_size=28, num_classes=10)
    assert vgg.fc.in_features == 512  # 28 -> 14 -> 7 -> 3 -> 1
    for m in (model, vgg):
        out = m(torch.rand(2, 1, 28, 28))
        assert out.shape == (2, 10)
        out.sum().backward()


def test_construction_errors():
    with pytest.raises(ValueError, match="img_size"):
        timm.create_model("lcnn_resnet18", img_size=(16,))
    with pytest.raises(ValueError, match="downsample"):
        timm.create_model("lcnn_vgg11", downsample="stride")
    with pytest.raises(ValueError, match="activation"):
        timm.create_model("lcnn_resnet18", act_layer="no_such_act")
    with pytest.raises(ValueError, match="too small"):
        timm.create_model("lcnn_vgg11", img_size=8)


@pytest.mark.parametrize("name", ["lcnn_resnet18", "lcnn_vgg11"])
@torch.no_grad()
def test_freeze_keeps_eval_outputs(name):
    model = _trained_stats(timm.create_model(name, **SMALL))
    assert any(float(m.gamma) <= float(m.lipschitz_constant()) for m in model.modules()
               if isinstance(m, GammaBatchNorm2d))  # some clips are active
    frozen = freeze(model)
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-6)
    # the logits of these random nets hardly depend on x (their bias dominates): compare the features too
    features = model.forward_features(x)
    assert features.std() > 1e-3
    torch.testing.assert_close(frozen.forward_features(x), features, rtol=1e-5, atol=1e-5 * features.abs().max().item())
    assert not any(is_spectral_normalized(m) or isinstance(m, GammaBatchNorm2d) for m in frozen.modules())
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, HalvesResidual)) for m in frozen.modules())  # all folded
    assert all(is_spectral_normalized(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    model(x)  # the original still works: its parametrized classes are untouched


def test_global_pool_follows_timm():
    """'' is no pooling (4-D map, no classifier allowed), 'flatten' the reference VGG head, timm types pool."""
    vgg = timm.create_model(
        "lcnn_vgg11", img_size=32, num_classes=5, stage_channels=((4,), (8,), (8, 8), (8, 8), (8, 8))
    ).eval()
    assert vgg.global_pool.pool_type == "flatten" and vgg.fc.in_features == vgg.head_hidden_size == 8 * 2 * 2
    x = torch.rand(2, 3, 32, 32)
    features = vgg.forward_features(x)
    assert features.shape == (2, 8, *timm.get_pretrained_cfg("lcnn_vgg11.cifar100").pool_size)
    vgg.reset_classifier(0)
    torch.testing.assert_close(vgg(x), features.flatten(1), rtol=0, atol=0)
    vgg.reset_classifier(0, "")
    torch.testing.assert_close(vgg(x), features, rtol=0, atol=0)
    vgg.reset_classifier(0, "catavgmax")
    expected = torch.cat([features.mean((2, 3)), features.amax((2, 3))], 1)
    torch.testing.assert_close(vgg(x), expected)
    assert vgg.head_hidden_size == 16
    vgg.reset_classifier(3, "catavgmax")
    assert vgg.fc.in_features == 16 and vgg(x).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes=0"):
        timm.create_model("lcnn_resnet18", global_pool="", **SMALL)


@pytest.mark.parametrize("kwargs, expected", [
    ({}, (3, 32, 32)),
    ({"in_chans": 1, "img_size": 8}, (1, 8, 8)),
    ({"img_size": (12, 16)}, (3, 12, 16)),
])
def test_pretrained_cfg_input_size_is_the_built_size(kwargs, expected):
    """timm's data pipeline and ``lcnn-timm evaluate`` read the input size from pretrained_cfg: it must be the size
    the spectral norms were computed for, not the registry default (issue 23)."""
    from timm.data import resolve_model_data_config

    model = timm.create_model("lcnn_resnet18", num_classes=4, **kwargs)
    config = resolve_model_data_config(model)
    assert model.pretrained_cfg["input_size"] == model.default_cfg["input_size"] == config["input_size"] == expected
    assert len(config["mean"]) == len(config["std"]) == expected[0]
    model.eval()(torch.rand(1, *config["input_size"]))  # the size it reports is one it runs at without a warning


def test_import_exposes_the_documented_submodules():
    """``lcnn_timm.export.freeze(model)`` after a bare ``import lcnn_timm`` (docs/models.md) raised AttributeError;
    checked in a fresh interpreter, where no test has imported the submodules yet."""
    import subprocess
    import sys

    names = ["certify", "convert", "curvature", "data", "evaluation", "export", "hub", "layers", "robustness", "train"]
    code = f"import lcnn_timm, types; assert all(isinstance(getattr(lcnn_timm, n), types.ModuleType) for n in {names})"
    subprocess.run([sys.executable, "-c", code], check=True)
