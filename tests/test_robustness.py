import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnn_timm.robustness import adversarial_accuracy, pgd_attack, pgd_sweep


def easy_task(n, seed):
    """8x8 grey images whose class is whether their mean brightness is above 0.5.

    The class offset of the mean is uniform in [0.01, 0.1], so L2 distances to the
    true boundary spread over roughly [0.08, 0.8] (Linf: [0.01, 0.1]).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    offset = torch.empty(n).uniform_(0.01, 0.1, generator=g) * (2 * y - 1)
    x = 0.5 + offset.view(n, 1, 1, 1) + 0.05 * torch.randn(n, 1, 8, 8, generator=g)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True) + (0.5 + offset).view(n, 1, 1, 1)
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Softplus(5.0), nn.Linear(16, 2))
    x, y = easy_task(512, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_pgd_breaks_a_standard_model_and_is_monotone_in_eps(trained):
    x, y = easy_task(256, seed=1)
    loader = [(x[:128], y[:128]), (x[128:], y[128:])]
    clean = (trained(x).argmax(1) == y).float().mean().item() * 100
    assert clean > 90, clean
    l2 = [r["accuracy"] for r in pgd_sweep(trained, loader, (0.05, 0.1, 0.2, 0.4, 0.8), "l2", progress=False)]
    assert l2[-1] < clean / 3
    assert all(a >= b for a, b in zip(l2, l2[1:])), l2
    assert l2[0] <= clean
    linf = [r["accuracy"] for r in pgd_sweep(trained, loader, (0.01, 0.03, 0.1), "linf", progress=False)]
    assert linf[-1] < clean / 3
    assert all(a >= b for a, b in zip(linf, linf[1:])), linf


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adversarial_examples_stay_in_the_box_and_the_ball(trained, norm):
    x, y = easy_task(64, seed=2)
    eps = 0.3 if norm == "l2" else 0.04
    adv = pgd_attack(trained, x, y, eps, norm, steps=5, restarts=2, generator=torch.Generator().manual_seed(0))
    assert adv.min() >= 0 and adv.max() <= 1
    dist = (adv - x).flatten(1).norm(dim=1) if norm == "l2" else (adv - x).flatten(1).abs().amax(dim=1)
    assert dist.max() <= eps * (1 + 1e-5)


def test_zero_steps_without_random_start_is_clean_accuracy(trained):
    x, y = easy_task(64, seed=3)
    clean = (trained(x).argmax(1) == y).float().mean().item() * 100
    result = adversarial_accuracy(trained, [(x, y)], eps=0.5, steps=0, random_start=False, progress=False)
    assert result["accuracy"] == pytest.approx(clean)
    assert result["count"] == 64


def test_restarts_never_hurt(trained):
    x, y = easy_task(128, seed=4)
    one = adversarial_accuracy(trained, [(x, y)], eps=0.3, steps=3, restarts=1, progress=False)
    three = adversarial_accuracy(trained, [(x, y)], eps=0.3, steps=3, restarts=3, progress=False)
    assert three["accuracy"] <= one["accuracy"]


def test_bad_arguments_are_named(trained):
    x, y = easy_task(4, seed=5)
    with pytest.raises(ValueError, match="l2"):
        pgd_attack(trained, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="eval mode"):
        pgd_attack(trained.train(), x, y, 0.1)
    trained.eval()


@pytest.mark.slow  # the full standard ensemble (FAB, Square) takes minutes on a shared CPU
def test_autoattack_breaks_an_undefended_model():
    pytest.importorskip("pyautoattack")
    from lcnn_timm.robustness import autoattack_accuracy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Softplus(), nn.Linear(16, 10)).eval()  # APGD-T targets 9 classes
    x = torch.rand(16, 1, 8, 8)
    y = model(x).argmax(1)  # clean accuracy 100 %
    result = adversarial_accuracy(model, [(x, y)], eps=2.0, steps=10, progress=False)
    auto = autoattack_accuracy(model, [(x, y)], eps=2.0, progress=False)
    assert auto["count"] == 16 and auto["accuracy"] <= result["accuracy"] + 100 / 16
    assert auto["accuracy"] < 100
