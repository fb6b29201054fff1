"""Softplus MaxMin: MaxMin in the limit, and its certified constants (Lipschitz 1, Hessian beta / 2) against exact
float64 derivatives, at the maximising point and by ascent."""
import math

import pytest
import torch
from torch import nn

from lcnn_timm.curvature import curvature_proxy
from lcnn_timm.curvature.penalty import curvature_penalty
from lcnn_timm.layers import CenteredSoftplus, SoftplusMaxMin, spectral_norm
from test_certify_bounds import certify_and_search


def test_sharp_limit_is_maxmin_and_zero_maps_to_zero():
    x = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    a, b = x.chunk(2, dim=1)
    sharp = SoftplusMaxMin(1e4).double()(x)
    torch.testing.assert_close(sharp, torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1), atol=2e-4, rtol=0)
    assert SoftplusMaxMin(3.0)(torch.zeros(2, 4)).eq(0).all()


def test_formula_is_the_log_cosh_of_the_pair_difference():
    layer = SoftplusMaxMin(2.5).double()
    beta = layer.beta.item()  # log beta is stored in float32 at construction
    x = torch.randn(7, 4, dtype=torch.float64) * 3
    a, b = x.chunk(2, dim=1)
    p, q = (a + b) / math.sqrt(2), (a - b) / math.sqrt(2)
    smooth_abs = 2.0 / beta * torch.log(torch.cosh(beta * q / 2))
    expected = torch.cat([(p + smooth_abs) / math.sqrt(2), (p - smooth_abs) / math.sqrt(2)], dim=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-14)


def test_odd_channel_count_is_refused():
    with pytest.raises(ValueError, match="C must be even"):
        SoftplusMaxMin()(torch.zeros(2, 3))


@pytest.mark.parametrize("beta", [0.5, 2.0, 9.0])
def test_constants_hold_and_the_hessian_bound_is_attained(beta):
    """One pair, ``f(a, b) = min(a, b)``-like output at ``q = 0``, where ``phi'' = beta / 2``: the bound is exact there."""
    layer = SoftplusMaxMin(beta).double()
    for point in (torch.zeros(2, dtype=torch.float64), torch.tensor([0.3, -1.2], dtype=torch.float64)):
        jacobian = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], point)
        assert torch.linalg.matrix_norm(jacobian, 2) <= 1 + 1e-12
    # output 1 (the smooth min) along u = v = (1, -1)/sqrt 2 at q = 0: D^2 = -phi''(0) / sqrt 2 * ..., norm beta / 2
    hessians = [torch.autograd.functional.hessian(lambda v, k=k: layer(v[None])[0, k], torch.zeros(2, dtype=torch.float64))
                for k in range(2)]
    u = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2)
    second = torch.stack([u @ h @ u for h in hessians])
    assert second.norm().item() == pytest.approx(layer.hessian_bound().item(), rel=1e-9)
    assert layer.hessian_bound().item() == pytest.approx(beta / 2, rel=1e-6)


def _maxmin_net(seed, dim=4, width=6, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(
        spectral_norm(nn.Linear(dim, width), init_iterations=0), SoftplusMaxMin(1.0 + 3 * seed),
        spectral_norm(nn.Linear(width, width), init_iterations=0), SoftplusMaxMin(2.0),
        spectral_norm(nn.Linear(width, classes)),
    ).double().eval()


@pytest.mark.parametrize("seed", range(3))
def test_certified_bounds_of_a_maxmin_network_hold_on_samples_and_ascent(seed):
    xs = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    # the Hessian ascent starts near q = 0, where phi'' peaks
    certify_and_search(_maxmin_net(seed), (4,), [(0, 1), (2, 0)], xs, 20, hessian_start_scale=0.01)


def test_beta_is_seen_by_the_penalty_and_the_proxy():
    net = _maxmin_net(0).float()
    betas = [m.beta.item() for m in net.modules() if isinstance(m, CenteredSoftplus)]
    assert len(betas) == 2
    assert curvature_penalty(net, 1.0, 0.0).beta_sum.item() == pytest.approx(sum(betas), rel=1e-6)
    assert curvature_proxy(net) == pytest.approx(sum(betas), rel=1e-5)  # every layer 1-Lipschitz


@pytest.mark.parametrize("act", ["maxmin", "softplus"])
def test_the_head_activation_term_is_exact_where_the_activation_peaks(act):
    """``x -> W act(x)`` (no layer before the activation): the certified Hessian of ``z_0 - z_1`` is attained at 0, and
    below the 2-norm product bound ``||w_0 - w_1|| beta / k`` it replaced."""
    torch.manual_seed(3)
    layer = SoftplusMaxMin(2.0) if act == "maxmin" else CenteredSoftplus(2.0)
    net = nn.Sequential(layer, spectral_norm(nn.Linear(4, 2))).double().eval()
    certificate = certify_and_search(net, (4,), [(0, 1)], torch.randn(2, 4, dtype=torch.float64), 10)
    f = lambda v: (lambda z: z[0, 0] - z[0, 1])(net(v[None]))  # noqa: E731
    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, torch.zeros(4, dtype=torch.float64))).abs().max()
    assert certificate.hessian[0, 1].item() == pytest.approx(exact.item(), rel=1e-8)
    row = (net[1].weight[0] - net[1].weight[1]).norm().item()
    beta = layer.beta.item()
    assert certificate.hessian[0, 1].item() < row * beta / (2 if act == "maxmin" else 4) * 0.95
