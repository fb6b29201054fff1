import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame, FrozenBatchNormAct2d, ScaledStdConv2d, StdConv2d, StdConv2dSame
from torch import nn

import lcnn_timm
from lcnn_timm.convert import ConversionReport, convert_model
from lcnn_timm.convert.catalog import ACTIVATIONS, LINEARS, PLAIN_CONVS, STANDARDIZED_CONVS
from lcnn_timm.curvature import UnsupportedStructureError, curvature_proxy
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm2d, is_spectral_normalized, operator_norm


def dense_operator_norm(layer, input_shape):
    x = torch.zeros(input_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v), x)
    return torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), 2).item()


CONV_CASES = {
    "conv": lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False),
    "depthwise_stride2": lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
    "conv2d_same_stride2": lambda: Conv2dSame(4, 6, 3, stride=2),
    "std_conv": lambda: StdConv2d(4, 6, 3),
    "std_conv_same_stride2": lambda: StdConv2dSame(4, 6, 3, stride=2),
    "scaled_std_conv": lambda: ScaledStdConv2d(4, 6, 3, gain_init=1.7),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_converted_conv_has_unit_operator_norm_and_same_direction(case):
    torch.manual_seed(0)
    original = nn.Sequential(CONV_CASES[case]()).double()
    converted, report = convert_model(original, input_size=(4, 7, 6), init_iterations=500)
    converted.eval()
    assert report.fully_converted, str(report)
    layer = converted[0]
    assert is_spectral_normalized(layer)
    assert dense_operator_norm(converted, (1, 4, 7, 6)) == pytest.approx(1.0, abs=1e-3)
    # the normalised layer computes the original forward (standardisation included) divided by sigma
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    bias = 0 if layer.bias is None else layer.bias.view(1, -1, 1, 1)
    expected = (original(x) - bias) / operator_norm(layer) + bias
    torch.testing.assert_close(converted(x), expected)


class _Marker(nn.Module):
    """A drop layer stand-in that records the order in which it ran."""

    def forward(self, x):
        return x * 3.0


@pytest.mark.parametrize("fused", [BatchNormAct2d, FrozenBatchNormAct2d])
def test_fused_norm_act_keeps_drop_and_order(fused):
    torch.manual_seed(0)
    norm_act = fused(5, act_layer=nn.ReLU, drop_layer=_Marker)
    with torch.no_grad():
        norm_act.running_mean.uniform_(-1, 1)
        norm_act.running_var.uniform_(0.5, 2)
        norm_act.weight.uniform_(0.5, 1.5)
        norm_act.bias.uniform_(-1, 1)
    converted, report = convert_model(nn.Sequential(norm_act), input_size=(5, 4, 4), gamma=100.0)
    unit = converted[0]
    assert list(dict(unit.named_children())) == ["bn", "drop", "act"]
    assert isinstance(unit.bn, GammaBatchNorm2d) and isinstance(unit.drop, _Marker)
    assert isinstance(unit.act, CenteredSoftplus)
    assert {(r.name, r.old) for r in report.replaced} >= {("0", fused.__name__), ("0.act", "ReLU")}
    converted.eval()
    x = torch.randn(3, 5, 4, 4)
    bn = (x - norm_act.running_mean.view(1, -1, 1, 1)) / (norm_act.running_var.view(1, -1, 1, 1) + norm_act.eps).sqrt()
    bn = bn * norm_act.weight.view(1, -1, 1, 1) + norm_act.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(converted(x), unit.act(bn * 3.0))


class _Relu(nn.Module):
    def forward(self, x):
        return F.relu(x)


class _Zoo(nn.Module):
    """One of each thing the converter must replace, leave alone or report."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.gate = nn.Sigmoid()
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.pool = nn.MaxPool2d(2)
        self.norm = nn.LayerNorm(8)
        self.conv1d = nn.Conv1d(8, 8, 1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.relu = _Relu()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = self.reflect(x * self.gate(x))
        x = self.pool(self.relu(x)).mean((2, 3))
        x = self.conv1d(self.norm(x).unsqueeze(-1)).squeeze(-1)
        return self.fc(x)


def test_report_lists_replacements_and_reasons():
    converted, report = convert_model(_Zoo(), input_size=(3, 8, 8))
    replaced = {r.name: (r.old, r.new) for r in report.replaced}
    assert replaced["bn"] == ("BatchNorm2d", "GammaBatchNorm2d")
    assert replaced["act"] == ("ReLU", "CenteredSoftplus")
    assert replaced["conv"][0] == "Conv2d" and "spectral-normalised" in replaced["conv"][1]
    assert replaced["fc"][0] == "Linear"
    assert [old for name, (old, _) in replaced.items() if name.startswith("relu:")] == ["relu()"]
    kinds = {e.name: e.kind for e in report.left_alone}
    assert kinds == {"gate": "gate", "reflect": "conv", "pool": "pool", "norm": "norm", "conv1d": "conv", "unused": "conv"}
    assert {e.name for e in report.unconverted} == {"reflect", "conv1d", "unused"}
    assert not report.fully_converted
    text = str(report)
    assert "padding_mode='reflect'" in text and "never ran" in text and "NOT fully converted" in text
    assert isinstance(converted.relu, torch.fx.GraphModule)
    assert not is_spectral_normalized(converted.reflect)
    converted(torch.randn(2, 3, 8, 8)).sum().backward()


class _Scalings(nn.Module):
    """Every way a parameter can meet the signal: as a factor (reported) or as an addend (not)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.layer_scale = nn.Parameter(torch.full((4,), 0.1))
        self.log_gain = nn.Parameter(torch.zeros(4))
        self.alpha, self.beta = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
        self.divisor = nn.Parameter(torch.ones(()))
        self.pos = nn.Parameter(torch.zeros(1, 4, 6, 6))
        self.proj = nn.Parameter(torch.eye(4))
        self.act = CenteredSoftplus(2.0)  # its log_beta is bounded by the theory

    def forward(self, x):
        x = self.conv(x) * self.layer_scale.view(1, -1, 1, 1) + self.pos
        x = self.act(x).mul(self.log_gain.exp()[None, :, None, None])
        x = torch.addcmul(self.beta.view(1, -1, 1, 1), self.alpha.view(1, -1, 1, 1), x) / self.divisor
        return F.linear(x.mean((2, 3)), self.proj)


def test_every_learned_scaling_is_reported():
    converted, report = convert_model(_Scalings(), input_size=(3, 6, 6))
    kinds = {e.name: (e.type_name, e.kind) for e in report.left_alone}
    assert kinds == {
        "layer_scale": ("_Scalings.layer_scale", "scaling"), "log_gain": ("_Scalings.log_gain", "scaling"),
        "alpha": ("_Scalings.alpha", "scaling"), "divisor": ("_Scalings.divisor", "scaling"),
        "proj": ("_Scalings.proj", "linear"),
    }
    assert not report.fully_converted and "NOT fully converted: 1 linear, 4 scaling left" in report.summary()
    converted(torch.randn(2, 3, 6, 6))


def test_resmlp_affine_and_layer_scales_are_reported():
    """resmlp_12: 25 Affine alphas and 12 + 12 layer scales; Affine's beta only shifts, so it is not listed."""
    model = timm.create_model("resmlp_12_224", pretrained=False, num_classes=5, img_size=32)
    _, report = convert_model(model, input_size=(3, 32, 32))
    counts = {}
    for entry in report.unconverted:
        assert entry.kind == "scaling"
        counts[entry.type_name] = counts.get(entry.type_name, 0) + 1
    assert counts == {"Affine.alpha": 25, "ResBlock.ls1": 12, "ResBlock.ls2": 12}
    assert not report.fully_converted
    assert {"blocks.0.norm1.alpha", "blocks.11.ls2", "norm.alpha"} <= {e.name for e in report.unconverted}


def test_summary_says_what_fully_means():
    _, report = convert_model(timm.create_model("resnet18", pretrained=False, num_classes=3), input_size=(3, 32, 32))
    last = report.summary().splitlines()[-1]
    assert last.startswith("fully converted: every ReLU-family activation, BatchNorm, conv/linear and learned scaling")
    assert last.endswith("(1 pool left alone as listed: not counted)")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y.relu_()  # in place: the later read of y must see the activation
        return F.gelu(y) + y


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = torch.relu(x)
        return self.block(x)


def test_functional_activations_rewritten_and_untraceable_forward_reported():
    torch.manual_seed(0)
    model = _Untraceable()
    converted, report = convert_model(model, input_size=(4, 5, 5), beta=3.0)
    assert [(e.name, e.kind) for e in report.unconverted] == [("<model>", "untraceable")]
    assert type(converted) is _Untraceable  # the root keeps its class; only the block was rewritten
    assert isinstance(converted.block, torch.fx.GraphModule)
    acts = [m for m in converted.block.modules() if isinstance(m, CenteredSoftplus)]
    assert len(acts) == 2
    assert sorted(r.old for r in report.replaced if r.name.startswith("block:")) == [".relu_()", "gelu()"]
    x = -torch.rand(1, 4, 5, 5)  # negative sum: the untraced relu branch is skipped
    act = CenteredSoftplus(3.0)
    y = act(converted.block.conv(x))
    torch.testing.assert_close(converted(x), act(y) + y)


def test_functional_activation_in_the_root_forward_gives_a_graph_module():
    converted, report = convert_model(_Relu(), input_size=(3, 4, 4))
    assert isinstance(converted, torch.fx.GraphModule) and report.fully_converted
    assert [(e.name, e.kind) for e in report.left_alone] == [("<model>", "note")]
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(converted(x), CenteredSoftplus()(x))


def _warm_up(model, input_size, steps=3):
    """Non-trivial running statistics, then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, *input_size) * 1.5 + 0.3)
    return model.eval()


def _relative_deviation(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_function_preserving_absorbs_spectral_scales_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
    )
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.mul_(4.0)
    _warm_up(model, (3, 8, 8))
    converted, report = convert_model(model, input_size=(3, 8, 8), function_preserving=True)
    converted.eval()
    assert [c.absorbed_by for c in report.compensations] == ["1", "3"]
    assert all(c.sigma > 1.5 for c in report.compensations)  # the scales were far from 1
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        # gamma clips are open: every gamma-BN keeps its full scale
        assert all(m.gamma >= m.lipschitz_constant() for m in converted.modules() if isinstance(m, GammaBatchNorm2d))
        assert _relative_deviation(converted(x), model(x)) < 1e-5


def test_function_preserving_deviation_shrinks_with_beta():
    torch.manual_seed(0)
    model = _warm_up(timm.create_model("resnet18", pretrained=False, num_classes=10), (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
    deviations = []
    for beta in (50.0, 1000.0):
        converted, report = convert_model(model, input_size=(3, 32, 32), function_preserving=True, beta=beta)
        assert [c.name for c in report.uncompensated] == ["fc"]  # the only layer with no BatchNorm after it
        converted.eval()
        with torch.no_grad():
            deviations.append(_relative_deviation(converted.forward_head(converted.forward_features(x), pre_logits=True), reference))
    # tolerance: the centered softplus sits within log(2)/beta of a ReLU; errors add up over 17 activations
    assert deviations[1] < 0.05 and deviations[1] < deviations[0] / 5


def _audit_is_complete(model, report: ConversionReport):
    """Independently of the converter: every unconverted activation, BatchNorm or conv/linear is reported."""
    reported = {e.name for e in report.left_alone}
    for name, module in model.named_modules():
        kind = type(module)
        unconverted = (
            kind in ACTIVATIONS
            or isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNormAct2d, FrozenBatchNormAct2d))
            and not isinstance(module, lcnn_timm.layers.gamma_batchnorm._GammaBatchNorm)
            or isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not is_spectral_normalized(module)
        )
        assert not unconverted or name in reported, f"{name} ({kind.__name__}) unconverted and unreported"


# the 13 models, plus StdConv2d (resnetv2_50x1_bit: timm's resnetv2_50 uses plain convs),
# ScaledStdConv2d (nf_regnet_b0) and MixedConv2d (mixnet_s); ~15 s in all at 64 x 64
MODELS = [
    "resnet18", "resnet50", "resnetv2_50", "resnetv2_50x1_bit", "seresnext26d_32x4d", "efficientnet_b0",
    "tf_efficientnet_b0", "mobilenetv3_large_100", "regnety_002", "densenet121", "cspresnet50", "dla34",
    "convnext_atto", "vit_tiny_patch16_224", "mixnet_s", "nf_regnet_b0",
]


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_converts_and_trains(name):
    torch.manual_seed(0)
    kwargs = dict(img_size=64) if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    converted, report = convert_model(model, input_size=(3, 64, 64))
    if name.startswith("convnext"):  # its blocks' layer-scale vectors
        assert {(e.type_name, e.kind) for e in report.unconverted} == {("ConvNeXtBlock.gamma", "scaling")}
    else:
        assert report.fully_converted, str(report)
    _audit_is_complete(converted, report)
    assert any(isinstance(m, CenteredSoftplus) for m in converted.modules())
    convs = [m for m in converted.modules() if type(m) in PLAIN_CONVS + STANDARDIZED_CONVS + LINEARS]
    assert not [m for m in convs if not is_spectral_normalized(m)]
    converted.train()
    out = converted(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.square().sum().backward()
    grads = [p.grad for n, p in converted.named_parameters() if n.endswith("log_beta")]
    assert grads and all(g is not None and torch.isfinite(g) for g in grads)
    if name.startswith("vit"):
        assert {"norm", "attention"} <= {e.kind for e in report.left_alone}
        with pytest.raises(UnsupportedStructureError):
            curvature_proxy(converted.eval())


def test_default_input_size_and_argument_errors():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    converted, _ = convert_model(model)  # input size from pretrained_cfg: 224 x 224
    assert converted.conv1.parametrizations.weight[0].operator.input_size == (224, 224)
    assert type(model.act1) is nn.ReLU  # not in place: the original is untouched
    with pytest.raises(ValueError, match="input_size"):
        convert_model(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="beta"):
        convert_model(model, beta=-1.0)
    same, _ = convert_model(model, input_size=(3, 32, 32), inplace=True)
    assert same is model and isinstance(model.act1, CenteredSoftplus)
    assert math.isclose(model.act1.beta.item(), 5.0, rel_tol=1e-6)


def test_converted_model_keeps_timm_conventions():
    """pretrained_cfg says the conversion size, and reset_classifier installs an LCNN head (it installed a plain
    nn.Linear, silently leaving the LCNN form; issue 24), on a copy without touching the original."""
    import copy

    import timm
    from timm.data import resolve_model_data_config

    from lcnn_timm import convert_model
    from lcnn_timm.layers import is_spectral_normalized

    model, _ = convert_model(timm.create_model("resnet18", num_classes=10), input_size=(3, 64, 64))
    assert model.pretrained_cfg["input_size"] == resolve_model_data_config(model)["input_size"] == (3, 64, 64)
    other = copy.deepcopy(model)
    other.reset_classifier(5)
    assert is_spectral_normalized(other.fc) and other.fc.out_features == 5
    assert torch.linalg.matrix_norm(other.fc.weight.detach().double(), 2).item() == pytest.approx(1.0, rel=1e-5)
    assert model.fc.out_features == 10 and other.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    other.reset_classifier(0)
    assert other.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 512)


def test_zero_initialised_operators_are_revived_before_normalisation():
    """A zero weight (resmlp's head) or zero gain (NF nets' last conv) has sigma = 0: W / sigma is undefined and its
    gradient 1 / sigma (2e12 in resmlp_12, which then diverged; issue 24). The converter revives them, says so, and
    the first step's gradients stay moderate; spectral_norm itself refuses a zero weight."""
    from lcnn_timm.layers import spectral_norm

    torch.manual_seed(0)
    conv = ScaledStdConv2d(3, 4, 3, padding=1)
    conv.gain.data.zero_()
    head = nn.Linear(4, 5)
    head.weight.data.zero_()
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    converted, report = convert_model(model, input_size=(3, 8, 8))
    text = str(report)
    assert "zero-initialised gain set to 1" in text and "zero-initialised weight re-initialised" in text
    loss = F.cross_entropy(converted.train()(torch.rand(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    largest = max(p.grad.abs().max().item() for p in converted.parameters() if p.grad is not None)
    assert torch.isfinite(loss) and largest < 100, largest
    with pytest.raises(ValueError, match="all-zero weight"):
        spectral_norm(nn.Linear(3, 2).requires_grad_(False).apply(lambda m: m.weight.zero_()))


def test_functional_max_pooling_is_reported():
    """inception_v3 calls F.max_pool2d in Mixed_6a/Mixed_7a: its report listed 2 of its 4 max-pools (issue 24)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return F.max_pool2d(F.relu(self.conv(x)), 2) + torch.max_pool2d(x.mean(1, keepdim=True), 2)

    model = nn.Sequential(Block(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(3))
    model(torch.rand(1, 3, 8, 8))
    _, report = convert_model(model, input_size=(3, 8, 8))
    pools = sorted(entry.type_name for entry in report.left_alone if entry.kind == "pool")
    assert pools == ["MaxPool2d", "max_pool2d()", "max_pool2d()"], pools
