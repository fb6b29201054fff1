"""Each penalty's parameter gradient against central finite differences; the FD GradReg against the exact one."""
import pytest
import torch
from torch import nn
from train_tiny_models import tiny_lcnn

from lcnn_timm.curvature import curvature_penalty
from lcnn_timm.train.regularizers import cure_penalty, frozen_state, gradreg_exact, gradreg_finite_difference, pgd_l2


def _smooth_net():
    """float64, batch-independent (no BN): finite differences of the penalty are then well defined."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Softplus(beta=2.0), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4)).double()


def _data():
    torch.manual_seed(1)
    return torch.rand(3, 1, 5, 5, dtype=torch.float64), torch.tensor([0, 2, 3])


def _penalty_fn(model, kind):
    x, y = _data()

    def penalty():
        inputs = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(inputs), y)
        if kind == "gradreg":
            return gradreg_exact(loss, inputs)
        return cure_penalty(loss, inputs, lambda z: nn.functional.cross_entropy(model(z), y), step=0.5)

    return penalty


def _check_against_finite_differences(model, penalty, params, h=1e-6):
    value = penalty()
    grads = torch.autograd.grad(value, params)
    for param, grad in zip(params, grads):
        flat = param.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
            old = flat[i].item()
            flat[i] = old + h
            up = penalty().item()
            flat[i] = old - h
            down = penalty().item()
            flat[i] = old
            assert abs((up - down) / (2 * h) - grad.view(-1)[i].item()) <= 1e-5 * (1 + abs(grad.view(-1)[i].item()))


def test_gradreg_exact_gradient_matches_finite_differences():
    model = _smooth_net()
    _check_against_finite_differences(model, _penalty_fn(model, "gradreg"), [model[0].weight, model[3].weight])


def test_cure_gradient_matches_finite_differences():
    model = _smooth_net()
    _check_against_finite_differences(model, _penalty_fn(model, "cure"), [model[0].weight, model[3].bias])


def test_curvature_penalty_gradient_matches_finite_differences():
    model = tiny_lcnn().double()
    params = [p for name, p in model.named_parameters() if name.endswith(("log_beta", "log_gamma"))]
    with torch.no_grad():  # put one log gamma below 0 so both sides of |log gamma| are exercised
        params[-1].fill_(-0.3)
    _check_against_finite_differences(model, lambda: curvature_penalty(model, 1e-3, 2e-3).total, params)


def test_gradreg_value_is_reference_formula():
    model = _smooth_net()
    x, y = _data()
    inputs = x.clone().requires_grad_(True)
    value = gradreg_exact(nn.functional.cross_entropy(model(inputs), y), inputs)
    norms = []
    for i in range(3):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xi), y[i:i + 1]), xi)
        norms.append(g.pow(2).sum())
    # R = 1e5 * sum(G^2) / B with G = grad of the batch mean = grad_i / B
    assert torch.allclose(value, 1e5 / 3 ** 3 * torch.stack(norms).sum())


def test_finite_difference_gradreg_approximates_exact_gradient():
    model = tiny_lcnn()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(mode):
        inputs = x.clone().requires_grad_(True)
        with frozen_state(model):  # identical buffers for both modes
            loss = nn.functional.cross_entropy(model(inputs), y)
            if mode == "exact":
                value = gradreg_exact(loss, inputs)
            else:
                value = gradreg_finite_difference(loss, inputs, lambda z: nn.functional.cross_entropy(model(z), y))
        return value, torch.cat([g.flatten() for g in torch.autograd.grad(value, params, allow_unused=True)
                                 if g is not None])

    exact_value, exact = grads("exact")
    fd_value, fd = grads("finite_difference")
    assert torch.allclose(exact_value, fd_value)
    cosine = torch.nn.functional.cosine_similarity(exact, fd, dim=0)
    assert cosine > 0.99, cosine
    assert (fd - exact).norm() / exact.norm() < 0.15


def test_pgd_stays_in_ball_and_raises_loss():
    model = _smooth_net().float()
    x = torch.rand(6, 1, 5, 5)
    labels = model(x).argmax(1)
    adv = pgd_l2(model, x, eps=0.5, step=0.2, steps=5, generator=torch.Generator().manual_seed(0))
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    loss = lambda z: nn.functional.cross_entropy(model(z), labels)  # noqa: E731
    assert loss(adv) > loss(x)


def test_model_side_penalty_gradients_equal_the_loss_penalty():
    """``curvature_penalty=(wb, wg)`` (for timm's train.py) gives the gradients of CE + the penalty in the loss."""
    import timm

    import lcnn_timm  # noqa: F401
    from lcnn_timm.curvature import curvature_penalty

    torch.manual_seed(0)
    hooked = timm.create_model("lcnn_resnet18_025", img_size=8, curvature_penalty=(0.05, 0.02))
    plain = timm.create_model("lcnn_resnet18_025", img_size=8)
    plain.load_state_dict(hooked.state_dict())
    with torch.no_grad():  # non-zero log gammas, so the |log gamma| term has a gradient
        for model in (hooked, plain):
            for name, p in model.named_parameters():
                if name.endswith("log_gamma"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(hooked(x), y).backward()
    loss = torch.nn.functional.cross_entropy(plain(x), y) + curvature_penalty(plain, 0.05, 0.02).total
    loss.backward()
    for (name, a), b in zip(hooked.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    # eval mode: no penalty gradient
    for model in (hooked, plain):
        model.zero_grad()
        model.eval()
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(hooked.parameters(), plain.parameters()))
    with pytest.raises(ValueError, match="pair"):
        timm.create_model("lcnn_resnet18_025", img_size=8, curvature_penalty=0.1)


def test_config_model_penalty_must_match_loss_weights():
    from lcnn_timm.train.config import load_config

    ok = load_config(None, {"beta_weight": 1e-3, "gamma_weight": 1e-3,
                            "model_kwargs": {"curvature_penalty": [1e-3, 1e-3]}})
    assert ok.model_kwargs["curvature_penalty"] == [1e-3, 1e-3]
    with pytest.raises(ValueError, match="disagrees with beta_weight"):
        load_config(None, {"beta_weight": 1e-3, "model_kwargs": {"curvature_penalty": [1e-3, 1e-3]}})


def test_model_side_penalty_is_logged_with_its_value(caplog):
    """Issue 24: under timm's train.py the penalty is only in the gradients, so the logged loss looked the same with
    and without it; the hook now logs the penalty's value (first training forward, then every log_interval-th)."""
    import logging

    import timm

    from lcnn_timm.curvature import add_penalty_to_backward, curvature_penalty

    model = timm.create_model("lcnn_resnet18_025", img_size=8)
    add_penalty_to_backward(model, 0.05, 0.02, log_interval=2)
    x = torch.rand(2, 1, 8, 8)
    with caplog.at_level(logging.INFO, logger="lcnn_timm.penalty"):
        for _ in range(3):
            model(x)
        model.eval()(x)  # eval forwards neither count nor log
    records = [r.getMessage() for r in caplog.records if r.name == "lcnn_timm.penalty"]
    assert [m.split("training forward ")[1].split(";")[0] for m in records] == ["1", "3"]
    expected = curvature_penalty(model, 0.05, 0.02).total.item()
    assert float(records[0].split("curvature penalty ")[1].split(" ")[0]) == pytest.approx(expected, rel=1e-3)


def _fake_timm_train_script():
    """A module shaped like timm's train.py: a config_parser for -c/--config, the main parser, _parse_args."""
    import argparse
    import types

    script = types.ModuleType("train")
    script.config_parser = argparse.ArgumentParser(add_help=False)
    script.config_parser.add_argument("-c", "--config", default="")
    script.parser = argparse.ArgumentParser()
    for option in ("--model", "--lr", "--epochs", "--model-kwargs"):
        script.parser.add_argument(option)
    script._parse_args = lambda: None
    return script


def test_keys_timm_train_py_ignores_are_warned_about(tmp_path, caplog):
    import logging

    import yaml

    from lcnn_timm.train.upstream import ignored_config_keys, warn_ignored_config_keys

    config = tmp_path / "lcnn.yaml"
    config.write_text(yaml.safe_dump({"model": "lcnn_resnet18_025", "lr": 0.05, "beta_weight": 1e-3,
                                      "precise_bn_batches": 20, "model_kwargs": {"curvature_penalty": [1e-3, 1e-3]}}))
    script = _fake_timm_train_script()
    with caplog.at_level(logging.WARNING, logger="lcnn_timm"):
        warn_ignored_config_keys(script, ["--config", str(config), "--epochs", "1"])
    (message,) = [r.getMessage() for r in caplog.records if r.name == "lcnn_timm"]
    assert "ignores these config keys: beta_weight, precise_bn_batches." in message
    # any other script, no config, or an unreadable one: nothing to say
    import types

    assert ignored_config_keys(types.ModuleType("other"), ["--config", str(config)]) is None
    assert ignored_config_keys(script, []) is None
    assert ignored_config_keys(script, ["--config", str(tmp_path / "missing.yaml")]) is None
