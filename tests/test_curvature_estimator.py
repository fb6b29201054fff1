import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnn_timm.curvature import (
    CurvatureNotMeaningfulWarning,
    curvature_statistics,
    estimate_curvature,
    gradient_stability,
)
from lcnn_timm.layers import CenteredSoftplus

SHAPE = (3, 8, 8)  # 192 input dimensions


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
    """Per-example gradient norm and Hessian spectral norm from the dense Hessian."""
    grads, norms = [], []
    for xi, yi in zip(x, y):
        def f(z):
            return F.cross_entropy(model(z.unsqueeze(0)), yi.unsqueeze(0))
        xi = xi.clone()
        grads.append(torch.autograd.functional.jacobian(f, xi).norm())
        hessian = torch.autograd.functional.hessian(f, xi).reshape(xi.numel(), xi.numel())
        norms.append(torch.linalg.eigvalsh(hessian).abs().max())
    return torch.stack(grads), torch.stack(norms)


@pytest.mark.parametrize("make_model", [mlp, cnn_with_batchnorm])
def test_matches_exact_hessian_per_example(make_model):
    model = make_model()
    x, y = batch()
    est = estimate_curvature(model, x, y, iterations=300, tol=1e-9, generator=torch.Generator().manual_seed(0))
    gradient_norm, hessian_norm = exact(model, x, y)
    torch.testing.assert_close(est.gradient_norm, gradient_norm, rtol=1e-9, atol=0)
    assert ((est.hessian_norm - hessian_norm).abs() / hessian_norm).max() < 0.01
    torch.testing.assert_close(est.curvature, est.hessian_norm / (gradient_norm + 1e-6))
    assert (est.iterations < 300).any(), "early stopping never triggered"


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
    full = estimate_curvature(model, x, y, iterations=150, generator=torch.Generator().manual_seed(0))
    early = estimate_curvature(model, x, y, iterations=150, tol=1e-6, generator=torch.Generator().manual_seed(0))
    # more than half stop early, so the graph is rebuilt on the rest at least once
    assert (early.iterations < 150).sum() >= 4
    torch.testing.assert_close(early.hessian_norm, full.hessian_norm, rtol=1e-4, atol=0)


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
