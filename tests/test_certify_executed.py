"""certify refuses every module whose execution differs from the function it would certify (issue 30).

Each construction below was certified on the earlier code with bounds the model exceeds; the tests check the refusal
(the static audit), that the differential check alone also refuses those it can see, and a property test over random
compositions of the supported leaves with and without tampering: refused, or every bound at least what ascent finds.
"""
import math
import random
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.certify import UnsupportedStructureError, certify
from lcnn_timm.certify import bounds as bounds_module
from lcnn_timm.certify.executed import audit_execution, differential_check
from lcnn_timm.certify.radius import certified_radii
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm2d, HalvesResidual, SoftplusMaxMin, spectral_norm
from test_certify_bounds import ascend, difference, grad_norm, random_gamma_bn, sn_linear


class ScaledIdentity(nn.Identity):
    def forward(self, x):
        return 10 * x


class ScaledSoftplus(CenteredSoftplus):
    def forward(self, x):
        return 10 * super().forward(x)


class UnscaledHalves(HalvesResidual):  # drops the 1/sqrt 2 and 1/2 scalings
    def forward(self, x):
        return self.act(self.residual(x) + self.shortcut(x))


class PermutingFlatten(nn.Flatten):
    def forward(self, x):
        return super().forward(x).flip(1)


def sn_conv(c_in, c_out, size, **kwargs):
    return spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs), size)


def small_net(middle: nn.Module = None, seed=0, pool: nn.Module = None) -> nn.Sequential:
    """conv -> gamma-BN -> softplus -> [middle] -> pool -> flatten -> linear, float64, eval, 1x6x6 inputs."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return nn.Sequential(
        sn_conv(1, 4, (6, 6)), random_gamma_bn(GammaBatchNorm2d(4), generator), CenteredSoftplus(2.0),
        middle if middle is not None else nn.Identity(), pool if pool is not None else nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), sn_linear(4, 3, iterations=30),
    ).double().eval()


def halves_net(block_class=HalvesResidual, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    residual = nn.Sequential(sn_conv(4, 4, (6, 6)), CenteredSoftplus(2.0), sn_conv(4, 4, (6, 6)))
    return small_net(block_class(residual, None, CenteredSoftplus(3.0)), seed)


def lipcnn(cls=None):
    model = timm.create_model("lcnn_lipcnn", num_classes=3, in_chans=1, img_size=12, stem_chs=4, stage_channels=(8, 8),
                              dense_chs=8).double().eval()
    if cls is not None:
        model.__class__ = cls(type(model))
    return model


def scaled_model_class(base):
    return type("ScaledLipCNN", (base,), {"forward": lambda self, x: 10 * base.forward(self, x)})


def head_changing_class(base):  # forward inherited, a method forward calls overridden
    return type("HeadLipCNN", (base,), {"forward_head": lambda self, x, pre_logits=False:
                                        10 * base.forward_head(self, x, pre_logits)})


def replaced_forward_sequential():
    net = small_net()
    net.forward = types.MethodType(lambda self, x: 10 * nn.Sequential.forward(self, x), net)
    return net


def hooked_leaf():
    net = small_net()
    net[2].register_forward_hook(lambda module, args, output: 10 * output)
    return net


def hooked_backward():
    net = small_net()
    net[2].register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 0.1,))
    return net


def conv_changed(**settings):
    def build():
        net = small_net()
        for key, value in settings.items():
            setattr(net[0], key, value)
        return net
    return build


CONSTRUCTIONS = {
    "model subclass with its own forward": (lambda: lipcnn(scaled_model_class), "not one of lcnn_timm's classes"),
    "model subclass overriding forward_head": (lambda: lipcnn(head_changing_class), "not one of lcnn_timm's classes"),
    "Identity subclass with its own forward": (lambda: small_net(ScaledIdentity()), "subclasses Identity"),
    "CenteredSoftplus subclass with its own forward": (lambda: small_net(ScaledSoftplus(2.0)),
                                                       "subclasses CenteredSoftplus"),
    "HalvesResidual subclass dropping its scalings": (lambda: halves_net(UnscaledHalves), "subclasses HalvesResidual"),
    "Sequential forward replaced on the instance": (replaced_forward_sequential, r"forward\(\) replaced"),
    "forward hook rescaling a leaf": (hooked_leaf, "forward_hooks registered"),
    "backward hook rescaling a gradient": (hooked_backward, "backward_hooks registered"),
    "conv padding_mode circular": (conv_changed(padding_mode="circular"), "padding_mode='circular'"),
    "conv padding_mode reflect": (conv_changed(padding_mode="reflect"), "padding_mode='reflect'"),
    "conv padding 1 -> 3": (conv_changed(padding=(3, 3)), "norm was computed and is bounded for"),
    "conv stride 1 -> 2": (conv_changed(stride=(2, 2)), "norm was computed and is bounded for"),
    "AvgPool2d divisor_override=-1": (lambda: small_net(pool=nn.Sequential(nn.AvgPool2d(2, divisor_override=-1),
                                                                           nn.AdaptiveAvgPool2d(1))),
                                      "divisor_override=-1"),
    "Flatten subclass permuting features": (lambda: small_net(pool=nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                                                                 PermutingFlatten())),
                                            "subclasses Flatten"),
    "Flatten over the batch dimension": (lambda: small_net(pool=nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                                                              nn.Flatten(0))), "start_dim must be"),
}
# the static audit alone sees these: the function runs identically in certify's chain and in model(x), so only the
# bound (a backward hook: the gradients certified_radii reads; negative pooling coefficients: the Schur test) or
# the batch (flattening across examples) is wrong
STATIC_ONLY = {"backward hook rescaling a gradient", "AvgPool2d divisor_override=-1", "Flatten over the batch dimension",
               "conv padding_mode reflect"}


@pytest.mark.parametrize("construction", list(CONSTRUCTIONS))
def test_each_construction_is_refused_with_its_reason(construction):
    build, reason = CONSTRUCTIONS[construction]
    with pytest.raises(UnsupportedStructureError, match=reason):
        certify(build())


@pytest.mark.parametrize("construction", sorted(set(CONSTRUCTIONS) - STATIC_ONLY))
def test_the_differential_check_alone_refuses_what_changes_the_function(construction, monkeypatch):
    monkeypatch.setattr(bounds_module, "audit_execution", lambda model, name: None)
    build, _ = CONSTRUCTIONS[construction]
    with pytest.raises(UnsupportedStructureError, match="differs from the chain|does not run the layers"):
        certify(build())


def test_untampered_models_pass_both_checks_exactly():
    for net, shape in [(small_net(), (1, 6, 6)), (halves_net(), (1, 6, 6)), (lipcnn(), (1, 12, 12))]:
        audit_execution(net, "net")
        assert differential_check(net, shape, "net") <= 1e-12
        certify(net)


def test_a_global_hook_refuses_every_certificate():
    handle = torch_module.register_module_forward_hook(lambda module, args, output: output)
    try:
        with pytest.raises(UnsupportedStructureError, match="global module hook"):
            certify(small_net())
    finally:
        handle.remove()
    certify(small_net())


def test_certified_radii_refuse_hooks_and_float32():
    net = small_net()
    certificate = certify(net)
    x, y = torch.rand(2, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1])
    certified_radii(net, x, y, certificate)
    with pytest.raises(ValueError, match="float64"):
        certified_radii(net.float(), x.float(), y, certificate)
    net.double()[2].register_forward_hook(lambda module, args, output: 10 * output)
    with pytest.raises(UnsupportedStructureError, match="forward_hooks"):
        certified_radii(net, x, y, certificate)


# ---- property test: random compositions of the supported leaves, with and without tampering ----

def _random_chain(rng: random.Random, seed: int):
    """A random float64 eval chain on 1x6x6 inputs (conv, gamma-BN, softplus / MaxMin, halves blocks, pooling)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    channels, size, layers = 1, 6, []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["conv", "halves"]) if channels > 1 else "conv"
        if kind == "conv":
            out = rng.choice([2, 4])
            layers += [sn_conv(channels, out, (size, size)), random_gamma_bn(GammaBatchNorm2d(out), generator)]
            channels = out
        else:
            layers.append(HalvesResidual(nn.Sequential(sn_conv(channels, channels, (size, size)),
                                                       CenteredSoftplus(rng.uniform(0.5, 4))),
                                         None, nn.Identity()))
        layers.append(SoftplusMaxMin(rng.uniform(0.5, 4)) if channels % 2 == 0 and rng.random() < 0.5
                      else CenteredSoftplus(rng.uniform(0.5, 4)))
    if rng.random() < 0.5:
        layers.append(nn.AvgPool2d(2))
        size //= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), sn_linear(channels, 3, iterations=30)]
    return nn.Sequential(*layers).double().eval()


def _tamper(net: nn.Sequential, rng: random.Random) -> str:
    """Apply one tampering that changes the executed function; returns its name."""
    position = rng.randrange(len(net) - 1)
    kind = rng.choice(["identity subclass", "hook", "instance forward", "softplus subclass", "flatten subclass",
                       "conv padding"])
    if kind == "identity subclass":
        net.insert(position, ScaledIdentity())
    elif kind == "hook":
        net[position].register_forward_hook(lambda module, args, output: 3 * output)
    elif kind == "instance forward":
        net.forward = types.MethodType(lambda self, x: 3 * nn.Sequential.forward(self, x), net)
    elif kind == "softplus subclass":
        net.insert(position, ScaledSoftplus(1.0).double())
    elif kind == "flatten subclass":
        flatten = next(i for i, layer in enumerate(net) if isinstance(layer, nn.Flatten))
        net[flatten] = PermutingFlatten()
    else:
        net[0].padding = (2, 2)
    net.double().eval()  # an inserted module joins in eval mode and float64, so only the tampering differs
    return kind


@pytest.mark.parametrize("seed", range(12))
def test_random_compositions_are_refused_when_tampered_and_bounded_when_not(seed):
    rng = random.Random(seed)
    net = _random_chain(rng, seed)
    tampered = _tamper(net, rng) if seed % 2 else None
    try:
        certificate = certify(net)
    except UnsupportedStructureError:
        assert tampered is not None, "an untampered composition of supported leaves was refused"
        return
    assert tampered is None, f"certified although tampered ({tampered})"
    f = difference(net, 0, 1, (1, 6, 6))
    start = torch.randn(36, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert ascend(f, start, grad_norm, steps=25) <= certificate.lipschitz[0, 1]


def test_gamma_bn_cap_agrees_between_float32_weights_and_the_float64_function():
    net = small_net().float()
    net[1].log_gamma.data.fill_(math.log(0.3))  # the cap binds
    certificate32 = certify(net)
    net64 = net.double()
    certificate64 = certify(net64)
    bound32 = dict(certificate32.layers)["Sequential.1"].lipschitz
    bound64 = dict(certificate64.layers)["Sequential.1"].lipschitz
    assert torch.allclose(bound32, bound64, rtol=1e-15, atol=0)
    # the float64 forward's per-channel scale never exceeds the bound (BN is affine: its Jacobian is that scale)
    bn = net64[1]
    x = torch.zeros(1, 4, 6, 6, dtype=torch.float64)
    scale = (bn(x + 1) - bn(x)).amax()
    assert scale <= bound64 * (1 + 1e-12)
    assert F.relu(bound64 - scale) / bound64 < 1e-12  # and attains it: the cap is the one the forward applies


def test_certified_radii_refuse_labels_that_do_not_match_the_images():
    net = small_net()
    with pytest.raises(ValueError, match="one label per image"):
        certified_radii(net, torch.rand(3, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1]), certify(net))
