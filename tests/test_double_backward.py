import contextlib

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lcnn_timm.curvature import frozen_parameters, lean_double_backward
from lcnn_timm.layers import CenteredSoftplus
from lcnn_timm.layers.centered_softplus import softplus_gate_grad
from tiny_layers import eval_batchnorm


def awkward_convnet():
    """Stride 2 on an even input (needs output_padding), tuple padding, dilation, groups, bias, 'same' padding."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=(1, 0), bias=True), eval_batchnorm(8), CenteredSoftplus(3.0),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False), eval_batchnorm(8, affine=False),
        nn.Softplus(2.0),
        Conv2dSame(8, 6, 4, stride=2), nn.Softplus(3.0),
        nn.Conv2d(6, 6, 3, padding="same"), nn.Tanh(),
        nn.Flatten(), nn.LazyLinear(5),
    ).double()


def input_batch(n=3, size=(3, 12, 14), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *size, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def gradient_and_hvps(model, x, y, vectors, lean: bool):
    """Lean: frozen parameters and the lean graph; plain: torch's own autograd everywhere (trainable betas too)."""
    x = x.clone().requires_grad_(True)
    frozen = frozen_parameters(model) if lean else contextlib.nullcontext()
    with frozen, (lean_double_backward() if lean else contextlib.nullcontext()):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=True)
    hvps = [torch.autograd.grad((g * v).sum(), x, retain_graph=True)[0] for v in vectors]
    return g.detach(), hvps


def test_gradient_and_hessian_vector_products_are_unchanged():
    model = awkward_convnet()
    x, y = input_batch()
    model(x)  # materialise the lazy linear
    model.eval()
    vectors = [torch.randn(x.shape, generator=torch.Generator().manual_seed(s), dtype=x.dtype) for s in range(3)]
    g_plain, h_plain = gradient_and_hvps(model, x, y, vectors, lean=False)
    g_lean, h_lean = gradient_and_hvps(model, x, y, vectors, lean=True)
    torch.testing.assert_close(g_lean, g_plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(h_lean, h_plain):
        scale = b.abs().max()
        assert scale > 1e-5  # a real curvature, not two zeros
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * scale.item())


class ConvolutionCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lean, per_layer", [(False, 3), (True, 2)])
def test_hvp_runs_two_convolutions_per_layer(lean, per_layer):
    layers = 4
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.Softplus())]).eval()
    x = torch.rand(2, 4, 8, 8, requires_grad=True)
    with frozen_parameters(model), (lean_double_backward() if lean else contextlib.nullcontext()):
        (g,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with ConvolutionCounter() as counter:
        torch.autograd.grad((g * torch.randn_like(x)).sum(), x)
    # plain double backward adds a weight-gradient-shaped convolution per layer that nothing uses
    assert counter.count == per_layer * layers


def test_trainable_parameters_keep_their_gradients():
    model = awkward_convnet()
    x, y = input_batch()
    model(x)
    model.eval()
    grads = []
    for mode in (contextlib.nullcontext(), lean_double_backward()):
        model.zero_grad()
        with mode:
            F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(grads[1]) == len(list(model.parameters()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_autocast_falls_back_to_the_plain_graph():
    conv = nn.Conv2d(3, 4, 3).requires_grad_(False)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    with lean_double_backward(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert out.dtype == torch.bfloat16 and grad.shape == x.shape


@pytest.mark.parametrize("beta, threshold", [(2.5, float("inf")), (3.0, 20.0), (0.5, 1.0)])
def test_softplus_gate_grad_has_the_softplus_second_derivatives(beta, threshold):
    """Its value is softplus' input gradient and its derivatives are softplus' second derivatives (float64)."""
    g = torch.Generator().manual_seed(0)
    # both sides of the threshold (where torch's softplus is linear), away from the kink itself
    x = torch.cat([torch.randn(40, generator=g, dtype=torch.float64) * 3, torch.tensor([0.0, 7.5, 12.0])])
    x = x[((x * beta) - threshold).abs() > 1e-3].requires_grad_()
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64, requires_grad=True)

    def reference(grad_out, x):
        (gx,) = torch.autograd.grad(F.softplus(x, beta, threshold), x, grad_out, create_graph=True)
        return gx

    torch.testing.assert_close(softplus_gate_grad(grad_out, x, beta, threshold), reference(grad_out, x))
    assert torch.autograd.gradcheck(lambda go, xx: softplus_gate_grad(go, xx, beta, threshold), (grad_out, x))
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    lean = torch.autograd.grad(softplus_gate_grad(grad_out, x, beta, threshold), (grad_out, x), v)
    exact = torch.autograd.grad(reference(grad_out, x), (grad_out, x), v)
    for a, b in zip(lean, exact):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_third_derivative_through_the_gate_raises():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    gx = softplus_gate_grad(torch.ones_like(x, requires_grad=True), x, 2.0)
    (h,) = torch.autograd.grad(gx.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(h.sum(), x)


class ElementwiseCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("act", [nn.Softplus(2.0), CenteredSoftplus(2.0)], ids=["softplus", "centered"])
def test_hvp_through_softplus_is_two_multiplies(act):
    model = nn.Sequential(nn.Linear(6, 6), act).double().eval()
    x = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    counts = {}
    for lean in (False, True):
        with (frozen_parameters(model) if lean else contextlib.nullcontext()), \
                (lean_double_backward() if lean else contextlib.nullcontext()):
            (g,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        with ElementwiseCounter() as counter:
            torch.autograd.grad(g, x, torch.ones_like(g))
        counts[lean] = counter.ops
    # sigmoid_backward: autograd differentiating the recorded sigmoid of the softplus backward
    assert "sigmoid_backward.default" in counts[False] and "sigmoid_backward.default" not in counts[True]
    assert len(counts[True]) < len(counts[False])
