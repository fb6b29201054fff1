import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm2d, HalvesResidual, spectral_norm


def conv_bn(cin, cout, size, stride=1):
    conv = spectral_norm(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), size)
    return nn.Sequential(conv, GammaBatchNorm2d(cout))


def build(seed):
    torch.manual_seed(seed)
    residual = nn.Sequential(conv_bn(4, 4, (8, 8)), CenteredSoftplus(), conv_bn(4, 4, (8, 8)))
    head = spectral_norm(nn.Linear(4, 3))
    return nn.Sequential(
        conv_bn(2, 4, (8, 8)), CenteredSoftplus(),
        HalvesResidual(residual, None, CenteredSoftplus()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), head,
    )


def test_safetensors_round_trip_into_fresh_model(tmp_path):
    model = build(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        model(torch.randn(4, 2, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")

    fresh = build(seed=1).eval()
    x = torch.randn(5, 2, 8, 8)
    assert not torch.equal(fresh(x), model(x))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(fresh(x), model(x))
