"""``lcnn_lipcnn``: every layer 1-Lipschitz (certified, and measured on the dense operator), certified bounds held by
exact float64 derivatives, clear errors for geometries it cannot have."""
import pytest
import timm
import torch

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.layers import SoftplusMaxMin, is_spectral_normalized
from test_certify_bounds import certify_and_search

TINY = dict(img_size=8, stem_chs=4, stage_channels=(4,), dense_chs=6, num_classes=3)


def _tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("lcnn_lipcnn", **{**TINY, **kwargs}).eval().double()


def test_default_layout():
    model = timm.create_model("lcnn_lipcnn")
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.num_classes == 10
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64, 128] and convs[-1].kernel_size == (7, 7)
    assert all(is_spectral_normalized(m) for m in [*convs, model.fc])
    assert sum(isinstance(m, SoftplusMaxMin) for m in model.modules()) == 4
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_every_layer_is_1_lipschitz_on_its_dense_operator():
    """The effective weights' operators, materialised and measured by SVD (the certificate uses its own bound)."""
    model = _tiny()
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    for block in [model.stem, *model.stages]:
        conv = block.conv
        jacobian = torch.autograd.functional.jacobian(lambda v: torch.nn.functional.conv2d(
            v, conv.weight, None, conv.stride, conv.padding).flatten(), x).reshape(-1, x.numel())
        assert torch.linalg.matrix_norm(jacobian, 2).item() == pytest.approx(1.0, abs=1e-5)
        x = block(x).detach()
    assert torch.linalg.matrix_norm(model.fc.weight, 2).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_certified_bounds_hold_against_exact_derivatives(seed):
    model = _tiny(seed)
    xs = torch.rand(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    certificate = certify_and_search(model, (1, 8, 8), [(0, 1), (1, 2), (2, 0)], xs, 8, hessian_start_scale=0.01)
    betas = [m.beta.item() for m in model.modules() if isinstance(m, SoftplusMaxMin)]
    head = model.fc.weight.detach()
    # 1-Lipschitz layers: L_ij = ||w_i - w_j||, up to the operator-norm bounds; K_ij = ||w_i - w_j|| sum(beta / 2)
    # over all but the last activation, whose term has a max-norm of w_i - w_j in place of the 2-norm
    row = (head[0] - head[1]).norm().item()
    assert certificate.lipschitz[0, 1] == pytest.approx(row, rel=2e-2)
    assert row * sum(betas[:-1]) / 2 * 0.98 < certificate.hessian[0, 1] < row * sum(betas) / 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(stem_chs=3), "stem_chs must be a positive even number"),
    (dict(stage_channels=(4, 5)), r"stage_channels\[1\] must be a positive even number"),
    (dict(img_size=2, stage_channels=(4, 4, 4)), "too small"),
])
def test_bad_geometries_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("lcnn_lipcnn", **{**TINY, **kwargs})
