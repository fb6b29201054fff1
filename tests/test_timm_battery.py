"""The checks of timm's own model battery (huggingface/pytorch-image-models ``tests/test_models.py``), re-stated
for every model lcnn_timm registers, at fast settings: narrow widths and 16x16 inputs, the default input size
only where a check is about the pretrained cfg. Deviations from timm's file are listed in docs/models.md.
"""
import math

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import lcnn_timm  # noqa: F401  (registers the models)

MODULES = ["cifar_resnet", "cifar_vgg", "lipschitz_cnn"]
MODELS = timm.list_models(module=MODULES)
TAGS = timm.list_models(module=MODULES, include_tags=True)
SIZE = 16


def _narrow(name):
    """Keyword arguments that keep a family's structure at a fraction of its width."""
    if "vgg" in name:
        return dict(stage_channels=((4,), (8,), (8, 8), (8, 8), (8, 8)))
    if "lipcnn" in name:
        return dict(stem_chs=4, stage_channels=(8, 8), dense_chs=8)
    return dict(channels=(4, 8, 8, 8))


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**_narrow(name), "img_size": SIZE, **kwargs})


def _input(model, batch=1, size=SIZE):
    return torch.randn(batch, model.in_chans if hasattr(model, "in_chans") else 1, size, size)


def _fx_model(model):
    """The model as a torchvision fx feature extractor returning the final node, traced as timm traces models."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares two cores
    yield
    torch.set_num_threads(threads)


def test_every_family_module_is_covered():
    assert len(MODELS) == 9 and set(TAGS) >= {f"{m}.fmnist" for m in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_grad_checkpointing(name):
    model = _create(name).eval()
    x = _input(model)
    out = model(x)
    assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = _create(name, num_classes=42).train()
    out = model(_input(model, batch=2))
    out.mean().backward()
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("tag", TAGS)
def test_default_cfg(tag):
    """timm's test_model_default_cfgs at the cfg's input size: pool_size, num_features, head_hidden_size, heads."""
    name = tag.split(".")[0]
    model = timm.create_model(tag, **_narrow(name)).eval()
    cfg, state_dict = model.pretrained_cfg, model.state_dict()
    assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg["input_size"])
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[1:] == (model.num_features, *cfg["pool_size"])
    assert pre_logits.shape == (1, model.head_hidden_size)

    model.reset_classifier(0)  # keeps the pooling: pooled (or flattened) features
    assert model.num_classes == 0
    out = model(x)
    assert out.shape == pre_logits.shape
    torch.testing.assert_close(out, pre_logits)
    model.reset_classifier(0, "")  # no classifier, no pooling: the unpooled map
    torch.testing.assert_close(model(x), features)
    bare = timm.create_model(tag, **_narrow(name), num_classes=0, global_pool="").eval()
    assert bare(x).shape == features.shape

    # timm checks that `classifier` and `first_conv` name weights in the state dict (spectrally normalised
    # layers too: they store their raw weight as <name>.weight)
    for module_name, ndim in ((cfg["classifier"], 2), (cfg["first_conv"], 4)):
        assert state_dict[f"{module_name}.weight"].ndim == ndim
    assert bare.get_submodule(cfg["first_conv"]).in_channels == cfg["input_size"][0]


@pytest.mark.parametrize("tag", timm.list_models(module=MODULES, pretrained=True))
def test_pretrained_loads(tag):
    """timm's test_model_load_pretrained / test_model_features_pretrained (the weights are shipped: offline)."""
    timm.create_model(tag, pretrained=True, in_chans=1, num_classes=5)
    backbone = timm.create_model(tag, pretrained=True, in_chans=1, num_classes=0).eval()
    assert backbone.num_classes == 0
    features = timm.create_model(tag, pretrained=True, features_only=True).eval()
    x = torch.rand(1, *timm.get_pretrained_cfg(tag).input_size)
    maps = features(x)
    assert len(maps) == len(backbone.feature_info) == (4 if "lipcnn" in tag else 5)  # stem and every stage
    torch.testing.assert_close(maps[-1], backbone.forward_features(x), rtol=0, atol=0)  # the same loaded weights


@pytest.mark.parametrize("fx", [False, True], ids=["script", "fx_script"])
@pytest.mark.parametrize("name", MODELS)
def test_torchscript(name, fx):
    """timm's test_model_forward_torchscript and test_model_forward_fx_torchscript."""
    with timm.set_scriptable(True):
        model = _create(name).eval()
    x = _input(model)
    scripted = torch.jit.script(_fx_model(model) if fx else model)
    with torch.inference_mode():
        out = scripted(x)
        torch.testing.assert_close(tuple(out.values())[0] if fx else out, model(x))


def _check_feature_maps(info, features, x):
    """timm's feature checks: >= 3 levels, channels as ``info`` says, spatial size ceil(size / reduction)."""
    channels, reductions = info.channels(), info.reduction()
    assert len(channels) >= 3 and len(features) == len(channels)
    for chs, reduction, feature in zip(channels, reductions, features):
        assert feature.shape == (x.shape[0], chs, *(math.ceil(s / reduction) for s in x.shape[-2:]))
        assert not torch.isnan(feature).any()


@pytest.mark.parametrize("name", MODELS)
def test_features_only_hooks_and_getter_agree(name):
    """features_only with timm's default wrapper and with its forward_intermediates-based 'getter'."""
    listed = _create(name, features_only=True).eval()
    getter = _create(name, features_only=True, feature_cls="getter").eval()
    x = _input(listed)
    features = listed(x)
    _check_feature_maps(listed.feature_info, features, x)
    for a, b in zip(features, getter(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pruned = _create(name, features_only=True, feature_cls="getter", out_indices=(1, 2))
    assert [f.shape for f in pruned.eval()(x)] == [f.shape for f in features[1:3]]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in getter.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    model = _create(name).eval()
    x = _input(model)
    final, intermediates = model.forward_intermediates(x)
    _check_feature_maps(timm.models.FeatureInfo(model.feature_info, range(len(model.feature_info))), intermediates, x)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    last_two = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    for a, b in zip(last_two, intermediates[-2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_and_backward(name):
    model = _create(name).eval()
    x = _input(model)
    with torch.inference_mode():
        expected = model(x)
        traced = tuple(_fx_model(model)(x).values())[0]
    assert torch.equal(traced, expected)
    model = _create(name, num_classes=42).train()
    out = tuple(_fx_model(model)(_input(model, batch=2)).values())[0]
    out.mean().backward()
    assert out.shape == (2, 42)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def _check_export(model, size):
    model.eval()
    x = _input(model, batch=2, size=size)
    exported = torch.export.export(model, (x,)).module()
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, kwargs", [
    # the families' structure at its shallowest: exporting traces every op, ~1 s per conv on this CPU
    ("lcnn_resnet18", dict(layers=(1, 1), channels=(4, 8))),
    ("lcnn_vgg11", dict(stage_channels=((4,), (8,)))),
    ("lcnn_lipcnn", dict(stem_chs=4, stage_channels=(4,), dense_chs=4)),
])
def test_export_eval(name, kwargs):
    _check_export(timm.create_model(name, img_size=SIZE, **kwargs), SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_export_eval_full_models(name):
    model = timm.create_model(name)
    _check_export(model, model.img_size[0])
