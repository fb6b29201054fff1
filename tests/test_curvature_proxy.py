import math

import pytest
import torch
from torch import nn

from lcnn_timm.curvature import UnsupportedStructureError, curvature_penalty, curvature_proxy
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm1d, HalvesResidual, spectral_norm


def sn_linear(i, o):
    return spectral_norm(nn.Linear(i, o), init_iterations=500)


def counterexample(beta=5.0):
    """The issue-14 network: f(x) = (s(x / sqrt 2) + s(-x / sqrt 2)) / sqrt 2, even, so f'(0) = 0."""
    first, second = nn.Linear(1, 2), nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        second.weight.copy_(torch.tensor([[1.0, 1.0]]))
        first.bias.zero_()
        second.bias.zero_()
    net = nn.Sequential(spectral_norm(first, init_iterations=500), CenteredSoftplus(beta),
                        spectral_norm(second, init_iterations=500))
    return net.double().eval()


def test_proxy_is_not_an_upper_bound_on_normalized_curvature():
    net = counterexample()
    assert curvature_proxy(net) == pytest.approx(5.0, rel=1e-6)
    x = torch.zeros(1, dtype=torch.float64)
    grad = torch.autograd.functional.jacobian(lambda v: net(v[None])[0, 0], x)
    hessian = torch.autograd.functional.hessian(lambda v: net(v[None])[0, 0], x)
    assert grad.abs().item() < 1e-12
    assert hessian.item() == pytest.approx(5.0 / (4 * math.sqrt(2.0)), rel=1e-6)  # 0.884
    normalized_curvature = hessian.abs().item() / (grad.abs().item() + 1e-6)  # the estimator's eps
    assert normalized_curvature > 1e5 * curvature_proxy(net)


def test_proxy_of_lcnn_chain_is_sum_of_betas_times_preceding_gammas():
    torch.manual_seed(0)
    bn1, bn2 = GammaBatchNorm1d(4, gamma=0.5), GammaBatchNorm1d(4, gamma=3.0)
    for bn in (bn1, bn2):
        bn.running_var.fill_(0.01)  # ||BN|| = 10 > gamma: the clip is active
    net = nn.Sequential(sn_linear(4, 4), bn1, CenteredSoftplus(2.0), sn_linear(4, 4), bn2, CenteredSoftplus(7.0))
    assert curvature_proxy(net) == pytest.approx(2.0 * 0.5 + 7.0 * 0.5 * 3.0, rel=1e-5)


def test_halves_block_proxy():
    torch.manual_seed(0)
    residual = nn.Sequential(sn_linear(4, 4), CenteredSoftplus(3.0), sn_linear(4, 4))
    block = HalvesResidual(residual, shortcut=None, act=CenteredSoftplus(2.0))
    net = nn.Sequential(block, HalvesResidual(nn.Sequential(sn_linear(4, 4)), sn_linear(4, 4), CenteredSoftplus(1.0)))
    # block 1: max(3, 0) then merge 1/sqrt2 then beta 2 -> K = 3 + 2/sqrt2, L = 1/sqrt2
    first = 3.0 + 2.0 / math.sqrt(2.0)
    assert curvature_proxy(net) == pytest.approx(first + (1 / math.sqrt(2.0)) * (1.0 / math.sqrt(2.0)), rel=1e-5)


class UnknownForward(nn.Module):
    """Stands in for a converted timm model: a container whose forward order the theory cannot see."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


@pytest.mark.parametrize(
    "bad, name",
    [
        (nn.Sequential(nn.Linear(3, 3), CenteredSoftplus()), r"Sequential\.0 \(Linear\) is not spectrally normalised"),
        (nn.Sequential(spectral_norm(nn.Linear(3, 3)), nn.ReLU()), r"Sequential\.1 \(ReLU\) is outside"),
        (nn.Sequential(nn.Sequential(nn.LayerNorm(3))), r"Sequential\.0\.0 \(LayerNorm\)"),
        (UnknownForward(nn.Sequential(spectral_norm(nn.Linear(3, 3)), nn.MaxPool1d(1))),
         r"UnknownForward\.body\.1 \(MaxPool1d\) is max-pooling"),
        (UnknownForward(spectral_norm(nn.Linear(3, 3))), r"UnknownForward \(UnknownForward\) .* no bound_chain\(\)"),
    ],
)
def test_unsupported_structure_names_the_module(bad, name):
    with pytest.raises(UnsupportedStructureError, match=name):
        curvature_proxy(bad)


def test_penalty_value_and_gradient():
    net = nn.Sequential(CenteredSoftplus(2.0), GammaBatchNorm1d(3, gamma=0.25), CenteredSoftplus(5.0), GammaBatchNorm1d(3, gamma=4.0))
    penalty = curvature_penalty(net, beta_weight=0.1, gamma_weight=0.01)
    assert penalty.beta_sum.item() == pytest.approx(7.0, rel=1e-6)
    assert penalty.abs_log_gamma_sum.item() == pytest.approx(2 * math.log(4.0), rel=1e-6)
    assert penalty.total.item() == pytest.approx(0.7 + 0.02 * math.log(4.0), rel=1e-6)
    penalty.total.backward()
    # d(0.1 beta)/d log beta = 0.1 beta ; d(0.01 |log g|)/d log g = 0.01 sign(log g)
    assert net[0].log_beta.grad.item() == pytest.approx(0.2, rel=1e-6)
    assert net[1].log_gamma.grad.item() == pytest.approx(-0.01, rel=1e-6)
    assert net[3].log_gamma.grad.item() == pytest.approx(0.01, rel=1e-6)
