import math

import pytest
import torch
from torch import nn

from lcnn_timm.curvature import UnsupportedStructureError, curvature_penalty, curvature_upper_bound
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm1d, HalvesResidual, spectral_norm


def sn_linear(i, o):
    return spectral_norm(nn.Linear(i, o), init_iterations=500)


def random_gamma_bn(n, generator):
    bn = GammaBatchNorm1d(n, gamma=float(torch.empty(1).uniform_(0.5, 3, generator=generator)), affine=True)
    bn.running_var.uniform_(0.2, 2, generator=generator)
    bn.running_mean.normal_(generator=generator)
    bn.weight.data.uniform_(0.5, 1.5, generator=generator)
    bn.bias.data.normal_(generator=generator)
    return bn


def random_chain(dim, width, generator):
    def act():
        return CenteredSoftplus(float(torch.empty(1).uniform_(0.5, 5, generator=generator)))

    return nn.Sequential(
        sn_linear(dim, width), random_gamma_bn(width, generator), act(),
        sn_linear(width, width), random_gamma_bn(width, generator), act(),
        sn_linear(width, 1),
    ).double().eval()


def normalized_curvature(f, x):
    grad = torch.autograd.functional.jacobian(f, x)
    hessian = torch.autograd.functional.hessian(f, x)
    return (torch.linalg.eigvalsh(hessian).abs().max() / grad.norm()).item()


@pytest.mark.parametrize("seed", range(6))
def test_bound_holds_over_random_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = random_chain(5, 6, generator)
    bound = curvature_upper_bound(net)
    xs = torch.randn(150, 5, dtype=torch.float64, generator=generator) * 2
    worst = max(normalized_curvature(lambda v: net(v[None])[0, 0], x) for x in xs)
    assert 0 < worst <= bound


def test_bound_of_lcnn_chain_is_sum_of_betas_times_preceding_gammas():
    torch.manual_seed(0)
    bn1, bn2 = GammaBatchNorm1d(4, gamma=0.5), GammaBatchNorm1d(4, gamma=3.0)
    for bn in (bn1, bn2):
        bn.running_var.fill_(0.01)  # ||BN|| = 10 > gamma: the clip is active
    net = nn.Sequential(sn_linear(4, 4), bn1, CenteredSoftplus(2.0), sn_linear(4, 4), bn2, CenteredSoftplus(7.0))
    assert curvature_upper_bound(net) == pytest.approx(2.0 * 0.5 + 7.0 * 0.5 * 3.0, rel=1e-5)


def test_halves_block_bound():
    torch.manual_seed(0)
    residual = nn.Sequential(sn_linear(4, 4), CenteredSoftplus(3.0), sn_linear(4, 4))
    block = HalvesResidual(residual, shortcut=None, act=CenteredSoftplus(2.0))
    net = nn.Sequential(block, HalvesResidual(nn.Sequential(sn_linear(4, 4)), sn_linear(4, 4), CenteredSoftplus(1.0)))
    # block 1: max(3, 0) then merge 1/sqrt2 then beta 2 -> K = 3 + 2/sqrt2, L = 1/sqrt2
    first = 3.0 + 2.0 / math.sqrt(2.0)
    assert curvature_upper_bound(net) == pytest.approx(first + (1 / math.sqrt(2.0)) * (1.0 / math.sqrt(2.0)), rel=1e-5)


@pytest.mark.parametrize(
    "bad, name",
    [
        (nn.Sequential(nn.Linear(3, 3), CenteredSoftplus()), r"Sequential\.0 \(Linear\) is not spectrally normalised"),
        (nn.Sequential(spectral_norm(nn.Linear(3, 3)), nn.ReLU()), r"Sequential\.1 \(ReLU\) is outside"),
        (nn.Sequential(nn.Sequential(nn.LayerNorm(3))), r"Sequential\.0\.0 \(LayerNorm\)"),
    ],
)
def test_unsupported_structure_names_the_module(bad, name):
    with pytest.raises(UnsupportedStructureError, match=name):
        curvature_upper_bound(bad)


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
