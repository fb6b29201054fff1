import copy

import pytest
import torch
from timm.layers import Conv2dSame
from timm.utils import ModelEmaV3
from torch import nn

from lcnn_timm.layers import (
    CenteredSoftplus, GammaBatchNorm2d, is_spectral_normalized, normalized_layer_norms, operator_norm,
    refresh_spectral_norms, remove_spectral_norms, spectral_norm,
)


def dense_operator_norm(layer, input_shape):
    x = torch.zeros(input_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v), x)
    return torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), 2).item()


CONV_CASES = {
    "stride1": (dict(kernel_size=3, padding=1), (8, 8)),
    "stride2": (dict(kernel_size=3, stride=2, padding=1), (8, 8)),
    "stride2_even_input_odd_kernel_no_pad": (dict(kernel_size=3, stride=2), (9, 8)),
    "dilation2": (dict(kernel_size=3, dilation=2, padding=2), (7, 9)),
    "depthwise": (dict(kernel_size=3, padding=1, groups=4), (6, 6)),
    "grouped_1x1": (dict(kernel_size=1, groups=2), (5, 7)),
    "padding0_nonsquare": (dict(kernel_size=(3, 2), padding=0), (6, 5)),
    "padding_same": (dict(kernel_size=4, padding="same"), (6, 7)),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_operator_norm_matches_dense_jacobian_svd(case):
    torch.manual_seed(0)
    kwargs, size = CONV_CASES[case]
    in_ch = 4
    out_ch = 8 if kwargs.get("groups", 1) != 4 else 4
    conv = nn.Conv2d(in_ch, out_ch, bias=False, **kwargs).double()
    expected = dense_operator_norm(conv, (1, in_ch, *size))
    spectral_norm(conv, size, init_iterations=1000)
    assert operator_norm(conv).item() == pytest.approx(expected, rel=1e-3)
    assert dense_operator_norm(conv, (1, in_ch, *size)) == pytest.approx(1.0, rel=1e-3)


def test_timm_conv2d_same_uses_its_dynamic_padding():
    torch.manual_seed(0)
    conv = Conv2dSame(3, 5, kernel_size=3, stride=2, bias=False).double()
    expected = dense_operator_norm(conv, (1, 3, 8, 7))
    spectral_norm(conv, (8, 7), init_iterations=1000)
    assert operator_norm(conv).item() == pytest.approx(expected, rel=1e-3)


def test_linear_operator_norm_matches_svd():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7).double()
    expected = torch.linalg.matrix_norm(lin.weight.detach(), 2).item()
    spectral_norm(lin, init_iterations=500)
    assert operator_norm(lin).item() == pytest.approx(expected, rel=1e-6)
    assert torch.linalg.matrix_norm(lin.weight.detach(), 2).item() == pytest.approx(1.0, rel=1e-6)


def test_true_operator_norm_exceeds_reshaped_kernel_norm():
    """The point of operator normalisation: torch's reshaped-kernel norm under-estimates."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    reshaped = torch.linalg.matrix_norm(conv.weight.detach().reshape(8, -1), 2).item()
    spectral_norm(conv, (8, 8), init_iterations=300)
    assert operator_norm(conv).item() > 1.1 * reshaped


def small_model():
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), (8, 8))
    head = spectral_norm(nn.Linear(8 * 4 * 4, 5))
    return nn.Sequential(conv, GammaBatchNorm2d(8), CenteredSoftplus(), nn.Flatten(), head)


def trained_small_model():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_normalized_layer_norms_match_dense_svd_of_the_evaluated_layers():
    """A lagging layer (raw weights moved after its vectors converged) and a converged one, in float64."""
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False).double(), (7, 8))
    head = spectral_norm(nn.Linear(12, 5).double())
    model = nn.Sequential(conv, nn.Flatten(), head).eval()
    with torch.no_grad():
        conv.parametrizations.weight.original.add_(0.3 * torch.randn_like(conv.weight))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    norms = normalized_layer_norms(model)
    assert set(norms) == {"0", "2"}
    assert norms["0"] == pytest.approx(dense_operator_norm(conv, (1, 3, 7, 8)), rel=1e-6) and norms["0"] > 1.01
    assert norms["2"] == pytest.approx(dense_operator_norm(head, (1, 12)), rel=1e-6)
    assert norms["2"] == pytest.approx(1.0, rel=1e-6)
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())  # measured, not changed
    refresh_spectral_norms(model)
    assert normalized_layer_norms(model)["0"] == pytest.approx(1.0, rel=1e-6)


def test_eval_mode_runs_no_power_iteration():
    model = trained_small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(2, 3, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_mode_updates_singular_vectors():
    model = small_model().train()
    u = model[0].parametrizations.weight[0]._u.clone()
    model[0].weight.data  # noqa: B018 - property access alone must not iterate
    model(torch.randn(2, 3, 8, 8))
    assert not torch.equal(u, model[0].parametrizations.weight[0]._u)


def test_deepcopy_fx_and_ema_preserve_outputs():
    model = trained_small_model()
    x = torch.randn(3, 3, 8, 8)
    expected = model(x)
    assert torch.equal(copy.deepcopy(model)(x), expected)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), expected)
    ema = ModelEmaV3(model, decay=0.5)
    ema.update(model)
    assert torch.allclose(ema.module.eval()(x), expected, atol=1e-6)


def test_remove_spectral_norms_bakes_identical_function():
    model = trained_small_model()
    x = torch.randn(3, 3, 8, 8)
    expected = model(x)
    frozen = remove_spectral_norms(copy.deepcopy(model))
    assert not hasattr(frozen[0], "parametrizations")
    assert torch.allclose(frozen(x), expected, atol=1e-6)
    assert torch.equal(model(x), expected)  # the original keeps its parametrization


def test_wrong_spatial_size_in_training_is_a_clear_error():
    model = small_model().train()
    with pytest.raises(ValueError, match=r"spectrally normalised for input size \(8, 8\)"):
        model(torch.randn(2, 3, 10, 10))
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\)"):
        model(torch.randn(2, 4, 8, 8))


def test_conv_needs_input_size_and_zero_padding():
    with pytest.raises(ValueError, match="input_size"):
        spectral_norm(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        spectral_norm(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), (8, 8))
    with pytest.raises(TypeError, match="Conv1d"):
        spectral_norm(nn.Conv1d(3, 3, 3), (8,))


# (kernel, stride, padding, input size): the first two left the layer's norm 2.3% / 1.5% above 1
# after the former 30 power-iteration steps
DEFAULT_CASES = [(4, 2, 1, (7, 9)), (4, 2, 0, (7, 9)), (3, 1, 1, (8, 8)), (3, 2, 1, (9, 8)), (5, 3, 2, (11, 7)),
                 (1, 2, 0, (6, 5)), (2, 1, 0, (3, 3))]


@pytest.mark.parametrize("kernel,stride,padding,size", DEFAULT_CASES)
def test_registration_at_default_settings_normalises_to_within_0_1_percent(kernel, stride, padding, size):
    for seed in range(4):
        torch.manual_seed(seed)
        conv = spectral_norm(nn.Conv2d(4, 6, kernel, stride, padding, bias=False), size).eval()  # float32, defaults
        plain = nn.Conv2d(4, 6, kernel, stride, padding, bias=False).double()
        plain.weight.data.copy_(conv.weight.detach())
        assert dense_operator_norm(plain, (1, 4, *size)) == pytest.approx(1.0, abs=1e-3), f"seed {seed}"


def test_lanczos_separates_nearly_equal_top_singular_values():
    from lcnn_timm.layers.spectral_norm import lanczos_top_singular_value

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    singular = torch.linspace(0.1, 1.0, 200, dtype=torch.float64)
    singular[-2] = 0.9999  # a 1e-4 gap: power iteration would need ~1e4 steps
    matrix = u[:, :200] @ torch.diag(singular) @ v.T
    sigma, vector = lanczos_top_singular_value(lambda x: matrix @ x, lambda y: matrix.T @ y, torch.randn(200, dtype=torch.float64))
    assert sigma == pytest.approx(1.0, rel=1e-6)
    assert (matrix @ vector).norm().item() == pytest.approx(1.0, rel=1e-6)


def test_other_input_size_warns_in_eval_and_is_refused_in_training():
    conv = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), (8, 8))
    conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"input size \(8, 8\) but got \(12, 12\).*convert_model"):
        conv(torch.randn(1, 3, 12, 12))
    conv.eval()
    with pytest.warns(UserWarning, match=r"evaluated at \(12, 12\).*can exceed 1"):
        conv(torch.randn(1, 3, 12, 12))


@pytest.mark.parametrize("name", ["StdConv2d", "ScaledStdConv2d", "StdConv2dSame"])
def test_weight_standardised_convs_are_refused(name):
    import timm.layers

    conv = getattr(timm.layers, name)(3, 4, 3)
    with pytest.raises(ValueError, match="standardises its weight.*convert_model"):
        spectral_norm(conv, (7, 9))


def test_torchscript_compiles_a_baked_copy_with_equal_outputs():
    import timm

    import lcnn_timm  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet18_025", num_classes=10, in_chans=1, img_size=28).eval()
    scripted = torch.jit.script(model)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(scripted(x), model(x))
    assert is_spectral_normalized(model.fc), "scripting must not change the eager model"


def test_state_dict_stores_the_raw_weight_under_weight_and_loads_both_formats():
    model = trained_small_model()
    state = model.state_dict()
    # timm (test_model_default_cfgs, classifier-dropping loaders) looks for <layer>.weight
    assert "0.weight" in state and "4.weight" in state and "4.bias" in state
    assert not any("parametrizations.weight.original" in k for k in state)
    # the stored tensor is the raw parameter V; the layer computes V / sigma(V)
    assert torch.equal(state["4.weight"], model[4].parametrizations.weight.original)
    assert not torch.allclose(state["4.weight"], model[4].weight)
    x = torch.randn(3, 3, 8, 8)
    for stored in (state, {k.replace("4.weight", "4.parametrizations.weight.original"): v for k, v in state.items()}):
        fresh = small_model().eval()
        assert not torch.equal(fresh(x), model(x))
        fresh.load_state_dict(stored)  # strict: no missing or unexpected key
        assert torch.equal(fresh(x), model(x))


def test_baked_layers_store_and_load_plain_keys():
    frozen = remove_spectral_norms(trained_small_model())
    state = frozen.state_dict()
    assert set(state) == {"0.weight", "1.running_mean", "1.running_var", "1.num_batches_tracked", "1.log_gamma",
                          "2.log_beta", "4.weight", "4.bias"}
    plain = remove_spectral_norms(small_model())
    plain.load_state_dict(state)
    assert torch.equal(plain[4].weight, frozen[4].weight)


def test_torchscript_of_a_graph_holding_normalised_layers():
    """A scripted fx graph (timm's fx TorchScript test) compiles baked copies of the normalised layers."""
    model = trained_small_model()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 3, 8, 8)
    scripted = torch.jit.script(graph)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-6, atol=1e-6)
    assert is_spectral_normalized(model[0]) and is_spectral_normalized(model[4])
