import math

import pytest
import torch
import torch.nn.functional as F

from lcnn_timm.layers import CenteredSoftplus
from lcnn_timm.layers.centered_softplus import _CenteredSoftplusFn, _flat_in_memory_order


def reference(x: torch.Tensor, beta: float) -> torch.Tensor:
    x = x.double()
    return (F.softplus(x * beta) - math.log(2.0)) / beta


def test_zero_maps_to_zero_exactly_and_under_composition():
    act = CenteredSoftplus(beta=3.7)
    x = torch.zeros(5, 7)
    y = x
    for _ in range(10):
        y = act(y)
    assert torch.equal(act(x), x)
    assert torch.equal(y, x)


@pytest.mark.parametrize("beta", [1e-3, 0.1, 1.0, 5.0, 100.0])
def test_matches_float64_reference(beta):
    x = torch.linspace(-40, 40, 20001)
    out = CenteredSoftplus(beta)(x).double()
    ref = reference(x, beta)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-7 / min(beta, 1.0))


@pytest.mark.parametrize("beta", [0.3, 2.0, 40.0])
def test_float64_is_accurate_to_rounding_on_both_sides_of_each_formula_switch(beta):
    """float64 is what certificates evaluate: against a 340-digit truth, 1e-13 relative everywhere, including the ulps
    around |beta x| = 0.01 and 0.05 (the float32 switch left a 1.3e-6 relative step there)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 340  # t down to 1e-300: the truth itself cancels against log 2
    act = CenteredSoftplus(beta).double()
    b = act.beta.item()
    t = [sign * switch * (1 + k * 1e-15) for switch in (0.01, 0.05) for sign in (1, -1) for k in range(-8, 9)]
    t += [sign * 10.0**e for e in range(-300, 3) for sign in (1, -1)]
    x = torch.tensor(t, dtype=torch.float64) / b
    with torch.no_grad():
        out = act(x)
    truth = torch.tensor([float((mpmath.log1p(mpmath.exp(mpmath.mpf(b) * mpmath.mpf(v))) - mpmath.log(2)) / b)
                          for v in x.tolist()], dtype=torch.float64)
    relative = ((out - truth).abs() / truth.abs()).max().item()
    assert relative <= 1e-13, relative


def test_normalized_curvature_never_exceeds_beta():
    beta = 4.0
    act = CenteredSoftplus(beta).double()
    x = torch.linspace(-20, 20, 40001, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    ratio = d2.abs() / d1.abs()
    beta = act.beta.item()  # log-parametrised in float32: not exactly 4
    assert ratio.max() <= beta * (1 + 1e-12)
    assert ratio.max() > 0.99 * beta  # the bound is tight far left


def test_small_beta_tends_to_half_identity():
    x = torch.linspace(-50, 50, 1001)
    out = CenteredSoftplus(beta=1e-7)(x)
    assert torch.allclose(out, x / 2, rtol=1e-5, atol=1e-6)


def test_large_beta_is_relu_within_log2_over_beta():
    beta = 200.0
    x = torch.linspace(-5, 5, 10001)
    gap = (CenteredSoftplus(beta)(x) - torch.relu(x)).abs()
    assert gap.max() <= math.log(2.0) / beta + 1e-6


def test_extreme_inputs_are_finite():
    with torch.no_grad():
        out = CenteredSoftplus(50.0)(torch.tensor([-1e30, -1e4, 1e4, 1e30]))
    assert torch.isfinite(out).all()
    assert out[2].item() == pytest.approx(1e4 - math.log(2) / 50, rel=1e-6)
    assert out[0].item() == pytest.approx(-math.log(2) / 50, rel=1e-5)


def test_fused_gradients_match_finite_differences():
    x = (torch.randn(3, 4, dtype=torch.float64) * 2).requires_grad_()
    log_beta = torch.tensor(math.log(2.5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_CenteredSoftplusFn.apply, (x, log_beta))


def test_bf16_follows_fp32():
    x = torch.randn(2, 8, 5, 5)
    act = CenteredSoftplus(5.0)
    out = act(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), act(x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf"), "5"])
def test_rejects_invalid_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        CenteredSoftplus(beta)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("beta", [0.05, 5.0, 200.0])
def test_fused_float32_gradients_match_float64_on_a_full_activation(beta, layout):
    """The fused backward (beta's gradient as a chunked float64-accumulated sum) at activation scale, in float32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, 16, 16, generator=g) * 2 + 0.5
    grad_out = torch.randn(x.shape, generator=g)
    x32 = x.clone(memory_format=layout).requires_grad_()
    log_beta32 = torch.tensor(math.log(beta), requires_grad=True)
    _CenteredSoftplusFn.apply(x32, log_beta32).backward(grad_out.contiguous(memory_format=layout))
    x64 = x.double().requires_grad_()
    log_beta64 = torch.tensor(math.log(beta), dtype=torch.float64, requires_grad=True)
    beta64 = log_beta64.exp()
    ((torch.nn.functional.softplus(beta64 * x64) - math.log(2)) / beta64).backward(grad_out.double())
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-6, atol=1e-7)
    assert log_beta32.grad.item() == pytest.approx(log_beta64.grad.item(), rel=5e-3)


def test_beta_gradient_same_for_every_layout():
    """Chunked sums (contiguous or channels_last, in memory order) and the plain one (mixed layouts) agree."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, 24, 24, generator=g)
    grad_out = torch.randn(x.shape, generator=g)
    contiguous, channels_last = torch.contiguous_format, torch.channels_last
    grads = []
    for x_layout, grad_layout in ((contiguous, contiguous), (channels_last, channels_last), (channels_last, contiguous)):
        xi = x.clone(memory_format=x_layout).requires_grad_()
        log_beta = torch.tensor(math.log(3.0), requires_grad=True)
        _CenteredSoftplusFn.apply(xi, log_beta).backward(grad_out.contiguous(memory_format=grad_layout))
        grads.append((xi.grad.contiguous(), log_beta.grad))
    for x_grad, beta_grad in grads[1:]:
        torch.testing.assert_close(x_grad, grads[0][0], rtol=0, atol=0)
        torch.testing.assert_close(beta_grad, grads[0][1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("make", [
    lambda t: t,
    lambda t: t.contiguous(memory_format=torch.channels_last),
    lambda t: t.permute(3, 1, 0, 2),
])
def test_flat_in_memory_order_views_dense_tensors(make):
    t = make(torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5))
    flat = _flat_in_memory_order(t)
    assert flat is not None and flat.data_ptr() == t.data_ptr() and flat.numel() == t.numel()
    assert torch.equal(flat.sort().values, torch.arange(120.0))
    torch.testing.assert_close(flat.sum(), t.sum())


def test_flat_in_memory_order_refuses_tensors_with_gaps():
    assert _flat_in_memory_order(torch.zeros(4, 6)[:, ::2]) is None
    assert _flat_in_memory_order(torch.zeros(4, 6)[:3, :5]) is None
