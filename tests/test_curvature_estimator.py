import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnn_timm.curvature import (
    DEFAULT_LANCZOS_STEPS,
    CurvatureNotMeaningfulWarning,
    curvature_statistics,
    estimate_curvature,
    gradient_stability,
)
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm2d

SHAPE = (3, 8, 8)  # 192 input dimensions


@pytest.fixture(autouse=True)
def _single_thread():
    """These tensors are tiny: on a shared CPU, extra threads make the exact Hessians ~25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(192, 32), CenteredSoftplus(3.0), nn.Linear(32, 32), nn.Softplus(2.0), nn.Linear(32, 5),
    ).double().eval()


def cnn_with_batchnorm():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), bn, CenteredSoftplus(4.0), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(96, 5),
    ).double().eval()


def batch(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def exact(model, x, y):
    """Per-example gradient norm and Hessian eigenvalues (ascending) from the dense float64 Hessian."""
    grads, eigenvalues = [], []
    for xi, yi in zip(x, y):
        def f(z):
            return F.cross_entropy(model(z.unsqueeze(0)), yi.unsqueeze(0))
        xi = xi.clone()
        grads.append(torch.autograd.functional.jacobian(f, xi).norm())
        hessian = torch.autograd.functional.hessian(f, xi).reshape(xi.numel(), xi.numel())
        eigenvalues.append(torch.linalg.eigvalsh(hessian))
    return torch.stack(grads), torch.stack(eigenvalues)


def spectral_norm(eigenvalues):
    return eigenvalues.abs().max(dim=1).values


def relative_error(estimate, truth):
    return (estimate - truth).abs() / truth


def issue_mlp(seed):
    """The issue's MLP 36-16-16-10 with centered softplus."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(36, 16), CenteredSoftplus(), nn.Linear(16, 16), CenteredSoftplus(), nn.Linear(16, 10),
    ).double().eval()


def gamma_bn_convnet(seed):
    torch.manual_seed(seed)
    bn = GammaBatchNorm2d(8, gamma=1.0)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), bn, CenteredSoftplus(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), CenteredSoftplus(), nn.Flatten(), nn.Linear(128, 10),
    ).double().eval()


class QuadraticLogit(nn.Module):
    """Logits ``(x^T A x / 2, 0)``: at x = 0 the gradient is zero and the Hessian of the CE at label 0 is ``-A/2``."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x):
        x = x.flatten(1)
        z = 0.5 * ((x @ self.a) * x).sum(dim=1)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def opposite_pair(n=24):
    """Symmetric ``A`` whose two largest-magnitude eigenvalues are 2 and -1.96, the rest in (-0.4, 0.4)."""
    g = torch.Generator().manual_seed(0)
    spectrum = torch.cat([torch.tensor([2.0, -1.96]), torch.rand(n - 2, generator=g) * 0.8 - 0.4]).double()
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return basis @ torch.diag(spectrum) @ basis.T


@pytest.mark.parametrize("make_model, shape", [(issue_mlp, (36,)), (gamma_bn_convnet, (1, 8, 8))])
def test_default_settings_match_exact_hessian(make_model, shape):
    """At the default step count: median error <= 1 %, worst <= 5 %, signs right, over indefinite Hessians."""
    errors, hard = [], 0
    for seed in range(3):
        model = make_model(seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(8, *shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (8,), generator=g)
        est = estimate_curvature(model, x, y, generator=torch.Generator().manual_seed(seed))
        gradient_norm, eigenvalues = exact(model, x, y)
        errors.append(relative_error(est.hessian_norm, spectral_norm(eigenvalues)))
        torch.testing.assert_close(est.gradient_norm, gradient_norm, rtol=1e-9, atol=0)
        lowest, highest = eigenvalues[:, 0], eigenvalues[:, -1]
        hard += int(((lowest.abs() - highest.abs()).abs() < 0.2 * highest.abs()).sum())
        clear = (lowest.abs() - highest.abs()).abs() > 0.05 * spectral_norm(eigenvalues)
        extreme = torch.where(lowest.abs() > highest.abs(), lowest, highest)
        assert (est.eigenvalue[clear].sign() == extreme[clear].sign()).all()
        assert (est.iterations == DEFAULT_LANCZOS_STEPS).all()
    errors = torch.cat(errors)
    assert hard >= 3, "the cases should include Hessians whose extreme eigenvalues have opposite signs, similar sizes"
    assert errors.median() <= 0.01 and errors.max() <= 0.05, f"median {errors.median():.2e}, worst {errors.max():.2e}"


@pytest.mark.parametrize("at_origin", [True, False])
def test_nearly_opposite_extreme_eigenvalues(at_origin):
    """Hessian eigenvalues -1 and +0.98 (at x = 0, where also the gradient is zero): power iteration cancels."""
    model = QuadraticLogit(opposite_pair()).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(3, 24, dtype=torch.float64) if at_origin else 0.05 * torch.randn(3, 24, generator=g).double()
    y = torch.zeros(3, dtype=torch.long)
    est = estimate_curvature(model, x, y, generator=torch.Generator().manual_seed(0))
    gradient_norm, eigenvalues = exact(model, x, y)
    assert relative_error(est.hessian_norm, spectral_norm(eigenvalues)).max() < 1e-3
    assert (est.eigenvalue < 0).all()
    if at_origin:  # zero gradient: C_f = ||H|| / eps, finite
        assert (gradient_norm == 0).all() and (est.gradient_norm == 0).all()
        torch.testing.assert_close(est.eigenvalue, torch.full_like(est.eigenvalue, -1.0), rtol=1e-6, atol=0)
        torch.testing.assert_close(est.curvature, est.hessian_norm / 1e-6)


def test_zero_hessian_and_gradient_stop_at_once():
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 5)).double().eval()
    for p in model[1].parameters():
        nn.init.zeros_(p)  # zero logits for every input: zero gradient, zero Hessian
    x, y = batch()
    est = estimate_curvature(model, x, y, generator=torch.Generator().manual_seed(0))
    for value in (est.gradient_norm, est.hessian_norm, est.eigenvalue, est.curvature):
        assert torch.equal(value, torch.zeros_like(value))
    assert (est.iterations == 1).all()


def test_low_rank_hessian_is_exact_after_rank_plus_one_steps():
    """A 3-unit bottleneck makes H rank <= 3: the Krylov space is invariant after 4 steps, the answer exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3), CenteredSoftplus(2.0), nn.Linear(3, 5)).double().eval()
    x, y = batch()
    est = estimate_curvature(model, x, y, iterations=30, generator=torch.Generator().manual_seed(0))
    _, eigenvalues = exact(model, x, y)
    assert (est.iterations == 4).all()
    assert relative_error(est.hessian_norm, spectral_norm(eigenvalues)).max() < 1e-10


@pytest.mark.parametrize("make_model", [mlp, cnn_with_batchnorm])
def test_converged_tol_matches_exact_hessian(make_model):
    model = make_model()
    x, y = batch()
    est = estimate_curvature(model, x, y, iterations=60, tol=1e-10, generator=torch.Generator().manual_seed(0))
    gradient_norm, eigenvalues = exact(model, x, y)
    torch.testing.assert_close(est.gradient_norm, gradient_norm, rtol=1e-9, atol=0)
    assert relative_error(est.hessian_norm, spectral_norm(eigenvalues)).max() < 1e-8
    torch.testing.assert_close(est.curvature, est.hessian_norm / (gradient_norm + 1e-6))
    assert (est.iterations < 60).all(), "early stopping never triggered"


def test_batch_examples_do_not_leak():
    model = cnn_with_batchnorm()
    x, y = batch(n=3)
    changed = x.clone()
    changed[1] = 1 - changed[1]
    before = estimate_curvature(model, x, y, iterations=5, generator=torch.Generator().manual_seed(0))
    after = estimate_curvature(model, changed, y, iterations=5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(before.eigenvalue[1], after.eigenvalue[1])
    for i in (0, 2):
        torch.testing.assert_close(before.eigenvalue[i], after.eigenvalue[i], rtol=1e-12, atol=0)
        torch.testing.assert_close(before.gradient_norm[i], after.gradient_norm[i], rtol=1e-12, atol=0)


def test_early_stopping_keeps_answers():
    model = mlp()
    x, y = batch(n=6, seed=3)
    full = estimate_curvature(model, x, y, iterations=30, generator=torch.Generator().manual_seed(0))
    early = estimate_curvature(model, x, y, iterations=30, tol=1e-4, generator=torch.Generator().manual_seed(0))
    # more than half stop early, so the graph is rebuilt on the rest at least once
    assert (early.iterations < 30).sum() >= 4 and (early.iterations > early.iterations.min()).any()
    torch.testing.assert_close(early.hessian_norm, full.hessian_norm, rtol=1e-6, atol=0)


def test_training_mode_is_refused():
    model = cnn_with_batchnorm().train()
    with pytest.raises(ValueError, match="eval mode"):
        estimate_curvature(model, *batch())


def test_relu_model_warns_not_meaningful():
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.ReLU(), nn.Linear(8, 5)).double().eval()
    x, y = batch()
    with pytest.warns(CurvatureNotMeaningfulWarning, match="piecewise-linear"):
        curvature_statistics(model, [(x, y)], iterations=2, progress=False)


def test_statistics_over_loader():
    model = mlp()
    x, y = batch(n=6)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    per_example, stats = curvature_statistics(model, loader, iterations=3, max_examples=5, progress=False)
    assert per_example["curvature"].shape == (5,)
    assert stats["curvature"]["mean"] == pytest.approx(per_example["curvature"].mean().item())
    assert stats["curvature"]["median"] == pytest.approx(per_example["curvature"].median().item())
    assert stats["gradient_norm"]["p5"] <= stats["gradient_norm"]["p95"]


def test_gradient_stability_is_first_order_hessian_action():
    model = mlp()
    x, y = batch(n=2)
    noise = 1e-5
    got = gradient_stability(model, x, y, noise_levels=[noise], generator=torch.Generator().manual_seed(5))[0]
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    for i in range(2):
        def f(z):
            return F.cross_entropy(model(z.unsqueeze(0)), y[i:i + 1])
        grad = torch.autograd.functional.jacobian(f, x[i])
        hessian = torch.autograd.functional.hessian(f, x[i]).reshape(192, 192)
        di = d[i].flatten() * noise / d[i].norm()
        expected = (hessian @ di).norm() / grad.norm()
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-3)
