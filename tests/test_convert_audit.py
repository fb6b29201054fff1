"""What runs after conversion is what the report says (issue 33): the op audit, functional activations inside timm's
no-trace modules, sign-keeping kernel maps, NormLinear heads from reset_classifier, and the audit gaps."""
import torch
from timm.models.efficientvit_mit import LiteMLA
from timm.models.levit import NormLinear
from timm.models.mobilevit import MobileVitV2Block
from timm.models.nfnet import NormFreeBlock, act_with_gamma
from torch import nn

from lcnn_timm.convert import convert_model
from lcnn_timm.convert.op_audit import count_ops
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm1d, PositiveSoftplus, is_spectral_normalized


class _HandWrittenRelu(nn.Module):
    """A ReLU neither the module catalog nor the fx search knows: a clamp at 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).clamp(min=0)


def test_op_audit_reports_an_activation_the_searches_miss():
    torch.manual_seed(0)
    converted, report = convert_model(_HandWrittenRelu(), input_size=(3, 6, 6))
    assert [(e.name, e.kind) for e in report.unconverted] == [("<model>", "activation")]
    assert "aten::clamp ran 1x" in report.unconverted[0].reason
    assert report.executed_ops == {"aten::clamp": 1} and not report.fully_converted


def _notrace_blocks() -> nn.Module:
    """mobilevitv2's block (F.relu in LinearSelfAttention) and dm_nfnet's (GammaAct's gelu): timm no-trace leaves."""
    return nn.Sequential(
        MobileVitV2Block(8, 8, transformer_depth=1, patch_size=2),
        NormFreeBlock(8, 8, act_layer=act_with_gamma("gelu", gamma=1.7)),
    )


def test_functional_activations_inside_timm_notrace_modules_are_converted():
    """mobilevitv2_050 ran 9 aten::relu and dm_nfnets 16 of 20 GELUs after conversion, reported fully converted."""
    torch.manual_seed(0)
    model = _notrace_blocks()
    before = count_ops(model, (8, 8, 8))
    assert {op for _, op in before} == {"aten::relu", "aten::gelu"}
    converted, report = convert_model(model, input_size=(8, 8, 8))
    assert report.fully_converted, str(report)
    assert not report.executed_ops  # nothing of the audited ops runs any more
    replaced = {r.name.split(":")[0] for r in report.replaced if r.new.startswith("CenteredSoftplus (")}
    assert replaced == {"0.transformer.0.attn", "1.act1", "1.act2", "1.act3"}
    # GammaAct keeps its constant gain around the new activation; its in-place mul_ now runs out of place
    x = torch.randn(2, 8, 4, 4)
    act1 = converted[1].act1
    torch.testing.assert_close(act1(x), 1.7 * act1.lcnn_act_0(x))
    converted.train()(torch.randn(2, 8, 8, 8)).square().sum().backward()


def test_linear_attention_kernel_map_stays_positive():
    """LiteMLA divides by q . sum(k) + eps: a centered softplus kernel map made that signed (efficientvit_b0:
    NaN at the second step); a positive softplus keeps it >= eps. LiteMLA is reported as attention."""
    torch.manual_seed(0)
    model = nn.Sequential(LiteMLA(16, 16, dim=8))
    converted, report = convert_model(model, input_size=(16, 4, 4))
    kernel = converted[0].kernel_func
    assert type(kernel) is PositiveSoftplus
    assert kernel(torch.linspace(-50, 50, 101)).min() >= 0
    assert ("0", "attention") in {(e.name, e.kind) for e in report.left_alone}
    assert report.fully_converted, str(report)


class _NormLinearHead(nn.Module):
    """levit / efficientvit_m0's head: timm's NormLinear (BatchNorm1d -> Linear), installed by reset_classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = NormLinear(8, 4)

    def reset_classifier(self, num_classes: int) -> None:
        self.head = NormLinear(8, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_reset_classifier_converts_the_batchnorm_of_a_norm_linear_head():
    converted, _ = convert_model(_NormLinearHead(), input_size=(3, 6, 6))
    converted.reset_classifier(5)
    assert type(converted.head.bn) is GammaBatchNorm1d and is_spectral_normalized(converted.head.linear)
    assert not [m for m in converted.modules() if type(m) is nn.BatchNorm1d]
    assert converted.eval()(torch.rand(2, 3, 6, 6)).shape == (2, 5)


class _Gaps(nn.Module):
    """Layers that were neither converted nor reported: an LSTM, Hardtanh, Threshold; and a Hardsigmoid gate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.hardtanh = nn.Hardtanh()
        self.threshold = nn.Threshold(0.1, 0.0)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        x = self.conv(x)
        seq, _ = self.lstm(x.flatten(2).transpose(1, 2))
        x = self.threshold(self.hardtanh(seq))
        return x * self.gate(x)


def test_lstm_hardtanh_threshold_are_reported_and_hard_gates_are_not_called_smooth():
    _, report = convert_model(_Gaps(), input_size=(3, 4, 4))
    entries = {e.name: e for e in report.left_alone}
    assert {name: e.kind for name, e in entries.items()} == {
        "lstm": "linear", "hardtanh": "activation", "threshold": "activation", "gate": "gate",
    }
    assert "piecewise-linear" in entries["gate"].reason and "bounded curvature" not in entries["gate"].reason
    assert not report.fully_converted
    assert set(report.executed_ops) == {"aten::hardtanh", "aten::threshold", "aten::hardsigmoid"}


def _conv_bn_net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act, nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8))
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(8, 3, 6, 6) * 1.5 + 0.3)
    return net.eval()


def test_report_says_whether_function_preservation_is_expected_and_measures_it():
    """conv -> BN -> ReLU keeps its function (within log(2)/beta per ReLU); a GELU net does not, at any beta."""
    results = {}
    for act in (nn.ReLU(), nn.GELU()):
        _, report = convert_model(_conv_bn_net(act), input_size=(3, 6, 6), function_preserving=True, beta=1000.0,
                                  measure_deviation=True)
        results[type(act).__name__] = report.preservation
    assert results["ReLU"].expected and results["ReLU"].reason.startswith("approximate")
    assert not results["GELU"].expected and "1 GELU" in results["GELU"].reason
    assert results["ReLU"].deviation < 0.01 < results["GELU"].deviation
    assert "function preservation NOT expected" in str(results["GELU"])
    _, report = convert_model(_conv_bn_net(nn.ReLU()), input_size=(3, 6, 6))
    assert not report.preservation.expected and report.preservation.deviation is None
