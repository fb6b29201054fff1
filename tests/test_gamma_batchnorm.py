import pytest
import torch

from lcnn_timm.layers import GammaBatchNorm1d, GammaBatchNorm2d


def dense_lipschitz(layer, shape):
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(layer, x).reshape(x.numel(), x.numel())
    return torch.linalg.matrix_norm(jac, 2).item()


def make(cls, num_features, gamma, affine):
    layer = cls(num_features, gamma=gamma, affine=affine).double()
    layer.running_var.uniform_(0.05, 2.0)
    layer.running_mean.normal_()
    if affine:
        layer.weight.data.uniform_(-2, 2)
        layer.bias.data.normal_()
    return layer.eval()


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("cls,shape", [(GammaBatchNorm2d, (1, 3, 2, 2)), (GammaBatchNorm1d, (1, 3))])
def test_lipschitz_is_clipped_to_gamma(cls, shape, affine):
    layer = make(cls, 3, gamma=0.5, affine=affine)
    lip = dense_lipschitz(layer, shape)
    assert lip <= 0.5 + 1e-9
    assert lip == pytest.approx(layer.lipschitz_constant().item(), rel=1e-9)


@pytest.mark.parametrize("affine", [False, True])
def test_large_gamma_equals_unclipped_batchnorm(affine):
    layer = make(GammaBatchNorm2d, 3, gamma=1e6, affine=affine)
    plain = torch.nn.BatchNorm2d(3, affine=affine).double().eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "log_gamma"})
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(layer(x), plain(x))
    assert dense_lipschitz(layer, (1, 3, 2, 2)) == pytest.approx(dense_lipschitz(plain, (1, 3, 2, 2)), rel=1e-9)


def test_gamma_receives_gradient_when_clipping():
    layer = make(GammaBatchNorm2d, 3, gamma=0.1, affine=False).float().train()
    layer(torch.randn(4, 3, 2, 2)).square().sum().backward()
    assert layer.log_gamma.grad is not None and layer.log_gamma.grad.abs() > 0


def test_bad_input_rank_and_channels():
    layer = GammaBatchNorm2d(4)
    with pytest.raises(ValueError, match="4D input"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="got 5 channels"):
        layer(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="2D or 3D"):
        GammaBatchNorm1d(4)(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("gamma", [0.0, -2.0, float("nan")])
def test_rejects_invalid_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        GammaBatchNorm2d(3, gamma=gamma)


@pytest.mark.parametrize("weight", [0.0, 1e-30, 1e-4])
def test_gradients_finite_at_zero_lipschitz(weight):
    # timm zero-initialises the last BN weight of residual blocks: L = 0 must not give NaN gradients
    bn = GammaBatchNorm2d(4, affine=True)
    bn.weight.data.fill_(weight)
    bn(torch.randn(2, 4, 3, 3)).sum().backward()
    assert torch.isfinite(bn.weight.grad).all() and torch.isfinite(bn.log_gamma.grad)


@pytest.mark.parametrize("gamma", [0.1, 10.0])  # clip active / inactive
@pytest.mark.parametrize("training", [False, True])
def test_clip_gradients_match_finite_differences(gamma, training):
    bn = make(GammaBatchNorm2d, 3, gamma=gamma, affine=True).train(training)
    bn.momentum = 0.0  # keep the running statistics fixed across gradcheck's evaluations
    # in training the clip holds the batch variance constant (as eval holds the running one), so its x-gradient is
    # checked against the definition below, and finite differences check the parameters'
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=not training)

    def f(x, weight, log_gamma):
        return torch.func.functional_call(bn, {"weight": weight, "log_gamma": log_gamma}, (x,))

    weight = bn.weight.detach().clone().requires_grad_()
    log_gamma = bn.log_gamma.detach().double().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, weight, log_gamma))


def _expected_lipschitz(plain, x, training):
    """``max_c |w_c| / sqrt(var_c + eps)`` from the variance BN divides by: the batch's (biased) in training, the
    running one in eval; the variance is held constant (detached), the weight is not."""
    variance = x.detach().var(dim=(0, 2, 3), unbiased=False) if training else plain.running_var
    return ((variance + plain.eps).rsqrt() * (plain.weight.abs() if plain.affine else 1)).max()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_clip_equals_batchnorm_times_clip(affine, momentum, training):
    # the definition bn(x) * min(1, gamma / L), L from the variance bn divides by; running statistics as torch's
    layer = make(GammaBatchNorm2d, 3, gamma=0.3, affine=affine).train(training)
    layer.momentum = momentum
    plain = torch.nn.BatchNorm2d(3, affine=affine, momentum=momentum).double().train(training)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "log_gamma"})
    for _ in range(2):  # the second step checks the cumulative-average count too
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * torch.tensor([0.2, 1.0, 3.0]).view(1, 3, 1, 1).double()
        normalized = plain(x)
        clip = torch.clamp(layer.gamma.double() / _expected_lipschitz(plain, x, training), max=1)
        torch.testing.assert_close(layer(x), normalized * clip, rtol=1e-12, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(plain, name), rtol=1e-12, atol=0)
    assert clip.item() < 1  # the clip is active, so a dropped or misplaced factor shows


@pytest.mark.parametrize("training", [False, True])
def test_clip_gradients_match_the_definition(training):
    layer = make(GammaBatchNorm2d, 3, gamma=0.3, affine=True).train(training)
    plain = torch.nn.BatchNorm2d(3).double().train(training)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "log_gamma"})
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    log_gamma = layer.log_gamma.detach().clone().requires_grad_()
    normalized = plain(x)
    gamma = log_gamma.exp()
    lipschitz = _expected_lipschitz(plain, x, training)
    assert lipschitz > 0.3  # the clip is active
    unfused = normalized * (gamma / torch.maximum(gamma, lipschitz))
    expected = torch.autograd.grad(unfused, (x, plain.weight, plain.bias, log_gamma), grad)
    actual = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias, layer.log_gamma), grad)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_training_clip_follows_the_batch_not_the_lagging_running_variance():
    """Fresh running statistics (variance 1) against activations of variance 1e-4: the training-mode clip must act
    (it is what the evaluated network applies once the statistics converge), not wait for the running average."""
    layer = GammaBatchNorm2d(2, gamma=10.0).train()
    x = torch.randn(64, 2, 4, 4) * 1e-2
    out = layer(x)
    assert layer.running_var.min() > 0.5  # the running average still lags
    torch.testing.assert_close(out.std(), torch.tensor(10 * 1e-2), rtol=0.05, atol=0)
    layer.eval()
    for _ in range(3):  # once the running statistics hold this batch's, eval applies the same map
        layer.train()(x)
    layer.running_var.copy_(x.var(dim=(0, 2, 3)))
    layer.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(layer.eval()(x), layer.train()(x), rtol=2e-2, atol=1e-4)


def test_running_statistics_match_batchnorm_in_float32_with_a_large_mean():
    """The running statistics match torch's at activation scale (32k values per channel) when the mean is 50 standard
    deviations, channels_last included (E[x^2] - E[x]^2 from two reductions was off by 1.8e-3 here)."""
    torch.manual_seed(0)
    layer, plain = GammaBatchNorm2d(8).train(), torch.nn.BatchNorm2d(8, affine=False).train()
    for _ in range(3):
        x = (50 + torch.randn(32, 8, 32, 32) * torch.linspace(0.5, 2, 8).view(1, -1, 1, 1))
        layer(x.contiguous(memory_format=torch.channels_last)), plain(x)
    torch.testing.assert_close(layer.running_mean, plain.running_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.running_var, plain.running_var, rtol=1e-5, atol=0)
