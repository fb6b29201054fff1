"""LCNNTask: every config regime lowers the loss on tiny synthetic data; loss parts add up; weight-decay groups."""
import pytest
import torch
from train_tiny_models import tiny_lcnn, tiny_standard

from lcnn_timm.train import AdversarialConfig, LCNNTask, param_groups

REGIMES = {
    "standard": (tiny_standard, {}),
    "lcnn": (tiny_lcnn, dict(beta_weight=1e-3, gamma_weight=1e-3)),
    "gradreg": (tiny_standard, dict(gradreg_weight=1e-3)),
    "gradreg_fd": (tiny_standard, dict(gradreg_weight=1e-3, gradreg_mode="finite_difference")),
    "lcnn_gradreg": (tiny_lcnn, dict(beta_weight=1e-3, gamma_weight=1e-3, gradreg_weight=1e-3)),
    "cure": (tiny_standard, dict(cure_weight=1e-3)),
    "adversarial": (tiny_standard, dict(adversarial=AdversarialConfig())),
}


def _data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    images = torch.rand(24, 1, 8, 8, generator=generator) * 0.3
    for i, label in enumerate(labels):  # class = which column band is bright
        images[i, :, :, 2 * label: 2 * label + 3] += 0.7
    return images, labels


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("amp", [False, True])
def test_a_few_steps_lower_the_loss(regime, amp):
    build, kwargs = REGIMES[regime]
    task = LCNNTask(build(), torch.nn.CrossEntropyLoss(), **kwargs)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1, momentum=0.9)
    images, labels = _data()
    losses = []
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            result = task(images, labels)
        result["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(result["loss"].item())
    assert losses[-1] < losses[0] - 0.05, losses
    parts = sum(v for k, v in result.items() if k.startswith("loss_"))
    assert torch.allclose(parts, result["loss"].detach(), rtol=1e-5)


def test_gradreg_double_backprop_reaches_parameters():
    images, labels = _data()
    base = LCNNTask(tiny_lcnn(), torch.nn.CrossEntropyLoss())
    reg = LCNNTask(tiny_lcnn(), torch.nn.CrossEntropyLoss(), gradreg_weight=1.0)
    base(images, labels)["loss"].backward()
    reg(images, labels)["loss"].backward()
    weight = lambda task: task.trainable_module[0][0].parametrizations.weight.original.grad  # noqa: E731
    assert not torch.allclose(weight(base), weight(reg))


def test_invalid_options_are_clear_errors():
    with pytest.raises(ValueError, match="gradreg_mode"):
        LCNNTask(tiny_lcnn(), gradreg_mode="approx")
    with pytest.raises(ValueError, match="beta_weight"):
        LCNNTask(tiny_lcnn(), beta_weight=-1.0)


def test_beta_gamma_are_excluded_from_weight_decay():
    model = tiny_lcnn()
    decay, no_decay = param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]) == ["log_beta"] * 3 + ["log_gamma"] * 3
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(beta_weight=1e-3, gamma_weight=1e-3),
                                    dict(beta_weight=1e-3, gamma_weight=1e-3, gradreg_weight=1e-3,
                                         gradreg_mode="finite_difference")], ids=["lcnn", "lcnn_gradreg_fd"])
def test_lcnn_under_torch_compile_matches_eager(kwargs):
    torch.manual_seed(0)
    eager = LCNNTask(tiny_lcnn(), torch.nn.CrossEntropyLoss(), **kwargs)
    compiled = LCNNTask(tiny_lcnn(), torch.nn.CrossEntropyLoss(), **kwargs)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend="inductor")
    images, labels = _data()
    for task in (eager, compiled):
        torch.manual_seed(1)
        task(images, labels)["loss"].backward()
    grads = [[p.grad for p in task.parameters()] for task in (eager, compiled)]
    for e, c in zip(*grads):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-5)
