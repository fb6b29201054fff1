"""freeze's BatchNorm folding and compiled activations (the model-level freeze test is in test_models.py)."""
import importlib

import pytest
import timm
import torch
from timm.layers import StdConv2d
from torch import nn

from lcnn_timm import convert_model
from lcnn_timm.export import fold_batchnorms, fold_halves_scalings, freeze
from lcnn_timm.layers import CenteredSoftplus, FoldedHalvesResidual, HalvesResidual
from tiny_layers import eval_batchnorm

# lcnn_timm.layers re-exports the function centered_softplus, which hides the submodule of that name
centered_softplus_module = importlib.import_module("lcnn_timm.layers.centered_softplus")


class Branches(nn.Module):
    """conv -> BN pairs that may fold, and three that must not."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), eval_batchnorm(4))  # folds
        self.no_affine = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
                                       eval_batchnorm(4, affine=False, seed=1))  # folds
        self.std = StdConv2d(4, 4, 3, padding=1)  # standardises its weight in forward: must not fold
        self.std_bn = eval_batchnorm(4, seed=2)
        self.shared_conv = nn.Conv2d(4, 4, 1)  # its output is read twice: must not fold
        self.shared_bn = eval_batchnorm(4, seed=3)
        self.after_act = eval_batchnorm(4, seed=4)  # not after a conv

    def forward(self, x):
        x = self.no_affine(self.plain(x))
        x = self.std_bn(self.std(x))
        y = self.shared_conv(x)
        return torch.tanh(self.shared_bn(y)) + y + self.after_act(torch.tanh(x))


def test_fold_batchnorms_keeps_outputs_and_folds_only_safe_pairs():
    model = Branches().double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorms(model) == 2
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert isinstance(model.plain[1], nn.Identity) and isinstance(model.no_affine[1], nn.Identity)
    assert all(isinstance(m, nn.BatchNorm2d) for m in (model.std_bn, model.shared_bn, model.after_act))


def test_fold_batchnorms_warns_on_untraceable_models():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), eval_batchnorm(3)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.warns(RuntimeWarning, match="cannot be traced"):
        assert fold_batchnorms(DataDependent().eval()) == 0


def test_failed_compilation_falls_back_to_the_eager_kernel(monkeypatch):
    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(centered_softplus_module, "_compiled_inference_kernel", broken)
    monkeypatch.setattr(centered_softplus_module._CompiledKernelState, "unavailable", False)
    act = CenteredSoftplus(3.0, compiled_inference=True)
    x = torch.randn(4, 5)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no C.. compiler"):
        y = act(x)
    torch.testing.assert_close(y, CenteredSoftplus(3.0)(x), rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_activations_match_eager_and_keep_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), eval_batchnorm(8), CenteredSoftplus(4.0)).eval()
    fused = freeze(model, compiled_activations=True)
    assert fused[2].compiled_inference
    for shape in ((2, 3, 8, 8), (3, 3, 5, 7)):  # one kernel for every shape
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = fused(x)  # gradients recorded: the autograd Function, not the compiled kernel
    assert type(y.grad_fn).__name__.startswith("_CenteredSoftplusFn")


def batchnorm_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name, remaining", [("efficientnet_b0", 0), ("resnetv2_50", 17)])
def test_freeze_folds_converted_timm_models(name, remaining):
    model, _ = convert_model(timm.create_model(name, num_classes=10))
    model.eval()
    frozen = freeze(model)
    # pre-activation BNs read no conv output and stay
    assert batchnorm_count(model) > batchnorm_count(frozen) == remaining
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(frozen(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def conv(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=1)


def test_fold_halves_scalings_keeps_outputs_and_skips_unfoldable_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(
        # identity shortcut
        HalvesResidual(nn.Sequential(conv(3, 3), nn.Tanh(), nn.Sequential(conv(3, 3))), act=nn.Tanh()),
        HalvesResidual(nn.Sequential(conv(3, 4, 2), nn.Tanh(), conv(4, 4)), shortcut=conv(3, 4, 2), act=nn.Tanh()),
        HalvesResidual(nn.Sequential(conv(4, 4), nn.Tanh()), act=nn.Tanh()),  # ends with an activation: stays
    ).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        assert fold_halves_scalings(model) == 2
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert [type(block) for block in model] == [FoldedHalvesResidual, FoldedHalvesResidual, HalvesResidual]
    assert model[0].shortcut_scale == pytest.approx(0.5 ** 1.5) and model[1].shortcut_scale == 1.0
