"""Certified Lipschitz / Hessian bounds never exceeded by exact float64 derivatives (sampling and ascent)."""
import itertools
import math

import pytest
import torch
from torch import nn

from lcnn_timm.certify import UnsupportedStructureError, certify
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm1d, GammaBatchNorm2d, HalvesResidual, spectral_norm
from test_curvature_proxy import counterexample


def random_gamma_bn(bn, generator):
    bn.log_gamma.data.fill_(math.log(float(torch.empty(1).uniform_(0.5, 3, generator=generator))))
    bn.running_var.uniform_(0.2, 2, generator=generator)
    bn.running_mean.normal_(generator=generator)
    if bn.weight is not None:
        bn.weight.data.uniform_(-1.5, 1.5, generator=generator)
        bn.bias.data.normal_(generator=generator)
    return bn


def act(generator):
    return CenteredSoftplus(float(torch.empty(1).uniform_(0.5, 8, generator=generator)))


def sn_linear(i, o, iterations=0):  # 0: an unconverged power iteration, which the bound must absorb
    return spectral_norm(nn.Linear(i, o), init_iterations=iterations)


def mlp(seed, dim=3, width=6, classes=3):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    residual = nn.Sequential(sn_linear(width, width), random_gamma_bn(GammaBatchNorm1d(width, affine=True), generator),
                             act(generator), sn_linear(width, width))
    return nn.Sequential(
        sn_linear(dim, width), random_gamma_bn(GammaBatchNorm1d(width), generator), act(generator),
        HalvesResidual(residual, None, act(generator)),
        HalvesResidual(nn.Sequential(sn_linear(width, width), act(generator)), sn_linear(width, width), act(generator)),
        sn_linear(width, classes),
    ).double().eval()


def cnn(seed, classes=3, size=(6, 5)):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv1 = spectral_norm(nn.Conv2d(1, 3, 3, stride=2, padding=1), size, init_iterations=0)
    conv2 = spectral_norm(nn.Conv2d(3, 4, 3, padding="same", dilation=1, groups=1), (3, 3), init_iterations=0)
    return nn.Sequential(
        conv1, random_gamma_bn(GammaBatchNorm2d(3), generator), act(generator),
        conv2, random_gamma_bn(GammaBatchNorm2d(4), generator), act(generator),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), sn_linear(4, classes),
    ).double().eval()


def difference(net, i, j, shape):
    return lambda v: (lambda z: z[0, i] - z[0, j])(net(v.reshape(1, *shape)))


def gradient_and_hessian_norms(f, x):
    grad = torch.autograd.functional.jacobian(f, x)
    hessian = torch.autograd.functional.hessian(f, x)
    return grad.norm().item(), torch.linalg.eigvalsh(hessian).abs().max().item()


def ascend(f, x, objective, steps=60):
    """Gradient ascent on ``objective(f, x)`` (a differentiable scalar) from ``x``; returns the best value."""
    x = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.1)
    best = 0.0
    for _ in range(steps):
        value = objective(f, x)
        best = max(best, value.item())
        optimizer.zero_grad()
        (-value).backward()
        optimizer.step()
    return best


def grad_norm(f, x):
    return torch.autograd.functional.jacobian(f, x, create_graph=True).norm()


def hessian_norm(f, x):
    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, x, create_graph=True)).abs().max()


def certify_and_search(net, shape, pairs, xs, steps, hessian_start_scale=1.0):
    """``certify(net)``, after checking that sampled and ascended gradient / Hessian norms of each pair's logit
    difference stay within its bounds (and are non-zero)."""
    certificate = certify(net)
    for i, j in pairs:
        f = difference(net, i, j, shape)
        worst_grad, worst_hessian = map(max, zip(*(gradient_and_hessian_norms(f, x) for x in xs)))
        worst_grad = max(worst_grad, ascend(f, xs[0], grad_norm, steps))
        worst_hessian = max(worst_hessian, ascend(f, xs[1] * hessian_start_scale, hessian_norm, steps))
        assert 0 < worst_grad <= certificate.lipschitz[i, j]
        assert 0 < worst_hessian <= certificate.hessian[i, j]
    return certificate


THOROUGH = pytest.param(True, marks=pytest.mark.slow, id="thorough")


@pytest.mark.parametrize("thorough", [False, THOROUGH])
@pytest.mark.parametrize("seed", range(3))
def test_mlp_bounds_hold_on_samples_and_ascent(seed, thorough):
    net = mlp(seed)
    cert = certify(net)
    generator = torch.Generator().manual_seed(100 + seed)
    xs = torch.randn(40 if thorough else 8, 3, dtype=torch.float64, generator=generator) * 2
    steps = 60 if thorough else 15
    for i, j in itertools.permutations(range(3), 2):
        f = difference(net, i, j, (3,))
        worst_grad, worst_hessian = map(max, zip(*(gradient_and_hessian_norms(f, x) for x in xs)))
        worst_grad = max(worst_grad, ascend(f, xs[0], grad_norm, steps))
        worst_hessian = max(worst_hessian, ascend(f, xs[1], hessian_norm, steps))
        assert 0 < worst_grad <= cert.lipschitz[i, j]
        assert 0 < worst_hessian <= cert.hessian[i, j]
    assert torch.equal(cert.lipschitz, cert.lipschitz.T) and cert.lipschitz.diagonal().eq(0).all()


@pytest.mark.parametrize("thorough", [False, THOROUGH])
@pytest.mark.parametrize("seed", range(2))
def test_cnn_bounds_hold(seed, thorough):
    net = cnn(seed)
    cert = certify(net)
    assert cert.input_shape == (1, 6, 5)
    generator = torch.Generator().manual_seed(200 + seed)
    xs = torch.rand(6 if thorough else 2, 30, dtype=torch.float64, generator=generator) * 4 - 2
    pairs = list(itertools.permutations(range(3), 2)) if thorough else [(0, 1), (2, 0)]
    for i, j in pairs:
        f = difference(net, i, j, (1, 6, 5))
        for x in xs:
            g, h = gradient_and_hessian_norms(f, x)
            assert g <= cert.lipschitz[i, j] and h <= cert.hessian[i, j]
        assert ascend(f, xs[0], grad_norm, 30 if thorough else 8) <= cert.lipschitz[i, j]
        assert ascend(f, xs[0], hessian_norm, 30 if thorough else 4) <= cert.hessian[i, j]


def test_counterexample_hessian_is_bounded_where_normalized_curvature_is_not():
    net = counterexample()
    cert = certify(net)
    hessian_at_zero = torch.autograd.functional.hessian(lambda v: net(v[None])[0, 0], torch.zeros(1, dtype=torch.float64))
    assert hessian_at_zero.item() == pytest.approx(0.884, abs=1e-3)
    # converged power iterations: the bound is beta / 4 = 1.25, a factor sqrt(2) above the sup |f''| (at 0)
    assert cert.logits.hessian.item() == pytest.approx(1.25, rel=1e-6)
    assert cert.logits.lipschitz.item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("thorough", [False, THOROUGH])
@pytest.mark.parametrize("seed", range(2))
def test_issue_chains_grid_search(seed, thorough):
    """Linear(2,16)-CSP-Linear(16,16)-CSP-Linear(16,1): the chains where the Theorem-1 expression failed 13.9x."""
    torch.manual_seed(seed)
    net = nn.Sequential(sn_linear(2, 16, 500), CenteredSoftplus(5.0), sn_linear(16, 16, 500), CenteredSoftplus(5.0),
                        sn_linear(16, 1, 500)).double().eval()
    cert = certify(net)
    axis = torch.linspace(-3, 3, 31 if thorough else 7, dtype=torch.float64)
    f = lambda v: net(v[None])[0, 0]  # noqa: E731
    worst = max(gradient_and_hessian_norms(f, torch.stack([a, b]))[1] for a in axis for b in axis)
    assert 0 < worst <= cert.logits.hessian


def test_average_pool_lipschitz_is_exact_for_global_and_disjoint_pools():
    from lcnn_timm.certify.bounds import average_pool_lipschitz

    assert average_pool_lipschitz(nn.AdaptiveAvgPool2d(1), (2, 4, 4)).item() == pytest.approx(0.25)
    assert average_pool_lipschitz(nn.AvgPool2d(2), (1, 4, 6)).item() == pytest.approx(0.5)
    # overlapping, zero-padded, count_include_pad=False: compare with the dense matrix
    pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    basis = torch.eye(16, dtype=torch.float64).reshape(16, 1, 4, 4)
    dense = pool(basis).flatten(1).T
    exact = torch.linalg.matrix_norm(dense, ord=2).item()
    assert exact <= average_pool_lipschitz(pool, (1, 4, 4)).item() <= 1.5 * exact


def test_gamma_bn_lipschitz_is_exact_with_and_without_affine():
    from lcnn_timm.certify.bounds import gamma_bn_lipschitz

    generator = torch.Generator().manual_seed(0)
    for affine in (False, True):
        bn = random_gamma_bn(GammaBatchNorm1d(5, affine=affine), generator).double().eval()
        jacobian = torch.autograd.functional.jacobian(lambda v: bn(v[None])[0], torch.zeros(5, dtype=torch.float64))
        assert gamma_bn_lipschitz(bn).item() == pytest.approx(torch.linalg.matrix_norm(jacobian, ord=2).item(), rel=1e-12)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="training mode: call model.eval"):
        certify(mlp(0).train())
    with pytest.raises(UnsupportedStructureError, match=r"Sequential\.1 \(ReLU\) is outside the theory"):
        certify(nn.Sequential(sn_linear(3, 3), nn.ReLU()).eval())
    with pytest.raises(UnsupportedStructureError, match=r"Sequential\.0 \(MultiheadAttention\) is attention"):
        certify(nn.Sequential(nn.MultiheadAttention(4, 1)).eval())
    with pytest.raises(ValueError, match=r"normalised for input size \(6, 5\) but sees \(8, 8\)"):
        certify(cnn(0), input_shape=(1, 8, 8))


# ---- issue 23, section 1: structures the walk used to misread


def _linear_net_lipschitz(net, dim):
    """Exact Lipschitz constant of z_0 - z_1 for a net that is linear in eval mode (its input gradient is constant)."""
    x = torch.zeros(1, dim, dtype=torch.float64, requires_grad=True)
    out = net(x)
    (grad,) = torch.autograd.grad(out[0, 0] - out[0, 1], x)
    return grad.norm().item()


class ScaledChain(nn.Sequential):  # the issue's counterexample: a Sequential subclass with its own forward
    def forward(self, x):
        return 10 * super().forward(x)


class ResidualChain(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


@pytest.mark.parametrize("cls", [ScaledChain, ResidualChain])
def test_sequential_subclass_with_its_own_forward_is_refused(cls):
    torch.manual_seed(0)
    net = nn.Sequential(cls(sn_linear(3, 3, 50), CenteredSoftplus(2.0)), sn_linear(3, 2, 50)).double().eval()
    with pytest.raises(UnsupportedStructureError, match="overrides forward"):
        certify(net)


def test_a_module_listed_twice_counts_twice():
    bn = GammaBatchNorm1d(3, gamma=5.0).double()
    bn.running_var.fill_(0.01)  # 1/sqrt(var) = 10 > gamma: Lipschitz exactly 5
    torch.manual_seed(0)
    net = nn.Sequential(sn_linear(3, 3, 50), bn, bn, sn_linear(3, 2, 50)).double().eval()
    exact = _linear_net_lipschitz(net, 3)
    assert exact > 20  # two passes through bn
    assert certify(net).lipschitz[0, 1].item() >= exact * (1 - 1e-9)


def test_a_module_in_training_mode_inside_an_eval_model_is_refused():
    from lcnn_timm.certify.radius import certified_radii

    net = mlp(0)
    certificate = certify(net)
    net[1].train()  # a gamma-BN: a forward would update its running statistics
    statistics = net[1].running_mean.clone()
    with pytest.raises(ValueError, match=r"^1 is in training mode"):
        certify(net)
    with pytest.raises(ValueError, match="training mode"):
        certified_radii(net, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), certificate)
    assert torch.equal(net[1].running_mean, statistics)


@pytest.mark.parametrize("input_scale,output_scale", [(1.0, 1.0), (2.0, -0.75)])
def test_halves_block_scales_are_read_from_the_instance(input_scale, output_scale):
    torch.manual_seed(0)
    block = HalvesResidual(nn.Sequential(sn_linear(3, 3, 50)), sn_linear(3, 3, 50))
    block.input_scale, block.output_scale = input_scale, output_scale
    net = nn.Sequential(block, sn_linear(3, 2, 50)).double().eval()
    exact = _linear_net_lipschitz(net, 3)
    assert certify(net).lipschitz[0, 1].item() >= exact * (1 - 1e-9)
