"""Certified radii: the formula, and PGD never changing a prediction inside its certified radius."""
import pytest
import torch
from torch import nn

from lcnn_timm.certify import certify
from lcnn_timm.certify.radius import certified_radii, curvature_radius, gradient_path_radius
from lcnn_timm.layers import CenteredSoftplus, SoftplusMaxMin, spectral_norm
from lcnn_timm.robustness.pgd import pgd_attack
from test_certify_bounds import cnn


def test_curvature_radius_is_the_root_of_the_quadratic_lower_bound():
    m, g, k = torch.tensor([0.3, 1.0, 2.0]), torch.tensor([0.5, 0.0, 3.0]), torch.tensor([4.0, 2.0, 0.0])
    r = curvature_radius(m, g, k)
    torch.testing.assert_close(m - g * r - k * r**2 / 2, torch.zeros(3), atol=1e-6, rtol=0)
    assert r[2].item() == pytest.approx(2.0 / 3.0)  # K = 0: the linear radius m / |g|
    edge = curvature_radius(torch.tensor([0.0, -1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    assert edge.tolist() == [0.0, 0.0, float("inf")]  # a tie, a misclassification, a constant function


def _flipped(net, x, y, eps, seed):
    adv = pgd_attack(net, x, y, eps, steps=30, restarts=2, generator=torch.Generator().manual_seed(seed))
    assert ((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-9)).all()
    with torch.no_grad():
        return (net(adv).argmax(dim=1) != y).sum().item()


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_pgd_never_flips_inside_the_certified_radius(seed):
    net = cnn(seed)
    certificate = certify(net)
    generator = torch.Generator().manual_seed(300 + seed)
    x = 0.3 + 0.4 * torch.rand(64, 1, 6, 5, dtype=torch.float64, generator=generator)  # room for PGD inside [0, 1]
    with torch.no_grad():
        net[-1].bias -= net(x).mean(dim=0)  # a random net predicts one class everywhere: centre its logits
        y = net(x).argmax(dim=1)
    assert len(y.unique()) > 1
    radii = certified_radii(net, x, y, certificate)
    combined = radii["combined"]
    # min_j max(first_j, curvature_j) >= max(min_j first_j, min_j curvature_j)
    assert torch.all(combined >= torch.maximum(radii["first_order"], radii["curvature"]))
    assert (combined > 0).all()
    # attack in groups of 8 examples of similar radius, each group at its smallest radius (so at most each radius)
    flipped_outside = 0
    for group in combined.argsort().split(8):
        assert _flipped(net, x[group], y[group], combined[group].min().item() * (1 - 1e-9), seed) == 0
        flipped_outside += _flipped(net, x[group], y[group], combined[group].max().item() * 20, seed)
    assert flipped_outside > 0  # the attack is strong enough to flip examples, just not inside the radii


def test_misclassified_examples_get_radius_zero():
    net = cnn(0)
    x = torch.rand(8, 1, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrong = (net(x).argmax(dim=1) + 1) % 3
    radii = certified_radii(net, x, wrong, certify(net))
    assert all(value.eq(0).all() for value in radii.values())


@pytest.mark.parametrize("switch", [0.05, 0.01])  # |beta x| where the activation changes formula (fp32, float64)
@pytest.mark.parametrize("side", [1, -1])
@pytest.mark.parametrize("label", [0, 1])
def test_no_flip_inside_the_radius_of_a_1d_net_straddling_the_softplus_series_switch(switch, side, label):
    """The activation's float64 evaluation is continuous to rounding where its series meets its closed form, and a
    head bias cancelling the activation (logits ~1e-9) is covered by the rounding allowance: a 1-D net whose margin
    is ~1e-8 is scanned over its whole certified interval (before: certified 3.2e-8, flipped 2e-11 away)."""
    act = CenteredSoftplus(2.0)
    linear = nn.Linear(1, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        linear.bias.zero_()
    head = spectral_norm(linear)
    net = nn.Sequential(act, head).double().eval()
    x0 = torch.tensor([[switch / act.beta.item() * (1 + side * 1e-9)]], dtype=torch.float64)
    sign = 1 if label == 0 else -1
    with torch.no_grad():
        centre = net(x0)[0, 0].item()
        head.bias.copy_(torch.tensor([-centre + sign * 5e-9, centre - sign * 5e-9]))
        y = net(x0).argmax(dim=1)
    assert y.item() == label
    radius = certified_radii(net, x0, y, certify(net, input_shape=(1,)))["combined"].item()
    assert radius > 1e-9
    grid = x0 + torch.linspace(-radius, radius, 20001, dtype=torch.float64).reshape(-1, 1) * (1 - 1e-12)
    with torch.no_grad():
        assert (net(grid).argmax(dim=1) == label).all()


def test_gradient_path_radius_is_the_root_of_its_integral():
    lipschitz = torch.tensor(2.0, dtype=torch.float64)
    margin = torch.tensor([1.0, 3.0, 0.2, 1.0, 1.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    grad = torch.tensor([0.5, 0.5, 1.9, 2.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    hessian = torch.tensor([1.0, 1.0, 5.0, 1.0, float("inf"), 0.0, 1.0, 1.0], dtype=torch.float64)
    radius = gradient_path_radius(margin, grad, lipschitz, hessian)
    for k in (0, 1, 2, 3, 5):  # trapezoid-rule quadrature of min(L, |g| + K t) over [0, r] gives back the margin
        t = torch.linspace(0, radius[k].item(), 200001, dtype=torch.float64)
        area = torch.trapezoid(torch.minimum(lipschitz, grad[k] + hessian[k] * t), t)
        assert area.item() == pytest.approx(margin[k].item(), rel=1e-6), k
    assert radius[1].item() == pytest.approx(2.0625)  # past the knee t* = 1.5: 1.5 + (3 - 1.875) / 2
    assert radius[3].item() == radius[4].item() == 0.5  # |g| = L, or K = inf: the first-order radius m / L
    assert radius[5].item() == 2.0  # K = 0: the gradient never grows, m / |g|
    assert radius[6].item() == radius[7].item() == 0.0
    assert (radius >= margin.clamp_min(0) / lipschitz).all()
    assert (radius >= curvature_radius(margin, grad, hessian) * (1 - 1e-15)).all()


@pytest.mark.parametrize("seed", range(3))
def test_no_flip_inside_the_gradient_path_radius_on_a_dense_grid(seed):
    """2-D inputs: every point of a 360-direction x 200-step polar grid inside each certified ball keeps its class,
    and the path radius beats the first-order one (so the grid tests what the new bound adds)."""
    torch.manual_seed(seed)
    net = nn.Sequential(spectral_norm(nn.Linear(2, 8)), SoftplusMaxMin(1.0 + seed), spectral_norm(nn.Linear(8, 8)),
                        CenteredSoftplus(2.0), spectral_norm(nn.Linear(8, 3))).double().eval()
    x = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = net(x).argmax(1)
    radii = certified_radii(net, x, y, certify(net))
    combined = radii["combined"]
    assert (combined > radii["first_order"] * 1.001).float().mean() > 0.5
    angles = torch.linspace(0, 2 * torch.pi, 361, dtype=torch.float64)[:-1]
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    steps = torch.linspace(0, 1, 201, dtype=torch.float64)[1:]
    for point, label, radius in zip(x, y, combined):
        grid = point + (radius * steps)[:, None, None] * directions[None] * (1 - 1e-9)
        with torch.no_grad():
            assert (net(grid.reshape(-1, 2)).argmax(1) == label).all()


def all_pairs_radii(net, x, y, certificate):
    """The reference: every class's input-gradient row (one backward each), every pair's radius, min over pairs."""
    x = x.clone().requires_grad_(True)
    logits = net(x)
    jacobian = torch.stack([torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)[0].flatten(1)
                            for c in range(logits.shape[1])], dim=1)
    logits = logits.detach()
    rows = torch.arange(len(y))
    scale = logits.abs() + (certificate.logit_offsets if certificate.logit_offsets is not None else 0)
    margins = logits[rows, y, None] - logits - 1e-9 * (scale[rows, y, None] + scale)
    grads = (jacobian[rows, y, None] - jacobian).norm(dim=-1) * (1 + 1e-9)
    lipschitz, hessian = certificate.lipschitz[y], certificate.hessian[y]
    first = torch.where(margins > 0, margins / lipschitz, torch.zeros_like(margins))
    curved = curvature_radius(margins, grads, hessian)
    path = torch.maximum(gradient_path_radius(margins, grads, lipschitz, hessian), torch.maximum(first, curved))
    others = torch.ones_like(margins, dtype=torch.bool)
    others[rows, y] = False
    return {kind: torch.where(others, value, torch.inf).amin(1)
            for kind, value in {"first_order": first, "curvature": curved, "combined": path}.items()}


@pytest.mark.parametrize("case", ["cnn", "lipcnn"])
def test_pruned_radii_equal_the_minimum_over_every_pair(case):
    import timm
    import lcnn_timm  # noqa: F401
    if case == "cnn":
        net, x = cnn(0, classes=5), torch.rand(40, 1, 6, 5, dtype=torch.float64)
    else:
        net = timm.create_model("lcnn_lipcnn", pretrained=True).double().eval()
        x = torch.rand(40, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    certificate = certify(net)
    with torch.no_grad():
        predicted = net(x).argmax(1)
    y = torch.where(torch.arange(len(x)) % 4 == 0, (predicted + 1) % certificate.lipschitz.shape[0], predicted)
    fast, reference = certified_radii(net, x, y, certificate), all_pairs_radii(net, x, y, certificate)
    assert (fast["combined"] > 0).sum() >= len(x) // 2  # most examples are certified: the pruning is exercised
    for kind in reference:
        torch.testing.assert_close(fast[kind], reference[kind], rtol=1e-12, atol=0)


def test_a_certificate_contradicted_by_a_gradient_is_refused():
    net = cnn(0)
    certificate = certify(net)
    certificate.lipschitz = certificate.lipschitz * 1e-3
    x = torch.rand(4, 1, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    with pytest.raises(ValueError, match="does not bound this model"):
        certified_radii(net, x, y, certificate)
