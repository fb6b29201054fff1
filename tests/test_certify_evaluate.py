"""The ``certified`` metric of ``lcnn-timm evaluate``, the card rows it feeds, and the gamma cap."""
import copy
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.certify import cap_gamma, certify
from lcnn_timm.certify.radius import certified_radii
from lcnn_timm.evaluation.datasets import EvalData
from lcnn_timm.evaluation.metrics import DEFAULT_METRICS, MetricOptions, run_metric
from lcnn_timm.evaluation.model import NormalizedModel
from lcnn_timm.hub.card import metrics_from_results
from lcnn_timm.layers.gamma_batchnorm import _GammaBatchNorm

SMALL = dict(num_classes=3, in_chans=1, img_size=8, layers=(1, 1), channels=(4, 8))


def eval_data(count=6):
    x = torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (count,), generator=torch.Generator().manual_seed(1))
    return EvalData(DataLoader(TensorDataset(x, y), batch_size=4), {"count": count})


def test_certified_metric_on_a_normalized_lcnn():
    torch.manual_seed(0)
    inner = timm.create_model("lcnn_resnet18", **SMALL).eval()
    model = NormalizedModel(inner, [0.5], [0.25]).eval()
    block = run_metric("certified", model, eval_data(), MetricOptions(pgd_eps=(0.0, 0.1), progress=False))
    assert "certified" in DEFAULT_METRICS and block["supported"] and block["count"] == 6
    # the normalisation multiplies every Lipschitz bound by 1 / std = 4; the metric certifies the float64 copy it
    # evaluates
    inner_bound = certify(copy.deepcopy(inner).double()).lipschitz
    assert abs(block["lipschitz_bound"]["max"] - 4 * inner_bound.max().item()) < 1e-9 * inner_bound.max().item()
    levels = block["levels"]
    assert [level["eps"] for level in levels] == [0.0, 0.1]
    for level in levels:
        assert max(level["first_order"], level["curvature"]) <= level["combined"] <= 100
    # at eps 0 the certified accuracy is the float64 clean accuracy (radius > 0 iff correct)
    x, y = next(iter(DataLoader(eval_data().loader.dataset, batch_size=6)))
    with torch.no_grad():
        correct = (model.double()(x.double()).argmax(dim=1) == y).sum().item()
    assert levels[0]["combined"] == 100.0 * correct / 6


def test_certified_metric_reports_unsupported_models():
    model = timm.create_model("cifar_resnet18", **SMALL).eval()
    block = run_metric("certified", model, eval_data(), MetricOptions(progress=False))
    assert block == {"supported": False, "reason": block["reason"]}
    assert "stem.conv (Conv2d) is not spectrally normalised" in block["reason"]
    linf = run_metric("certified", model, eval_data(), MetricOptions(pgd_norm="linf", progress=False))
    assert not linf["supported"] and "L2" in linf["reason"]


def test_card_rows_for_certified_accuracy():
    results = {"schema_version": 1, "dataset": {"name": "fashion_mnist", "split": "test"}, "metrics": {
        "certified": {"supported": True, "count": 100, "levels": [
            {"eps": 0.25, "first_order": 10.0, "curvature": 30.0, "combined": 31.0}]}}}
    (metric,) = metrics_from_results(results)
    assert metric.name == "Certified L2 accuracy (%), ε = 0.25" and metric.value == 31.0
    assert "first-order 10.00, curvature-based 30.00" in metric.protocol
    unsupported = {"schema_version": 1, "metrics": {"certified": {"supported": False, "reason": "x"}}}
    assert metrics_from_results(unsupported) == []


def test_gamma_cap_projects_after_every_step():
    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet18", **SMALL)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    cap_gamma(model, optimizer, 1.0)
    gammas = [m for m in model.modules() if isinstance(m, _GammaBatchNorm)]
    assert all(m.gamma.item() <= 1.0 for m in gammas)
    for _ in range(2):  # a large step pushes log gamma up; the hook brings it back
        for m in gammas:
            m.log_gamma.grad = torch.tensor(-1.0)
        optimizer.step()
        assert all(m.gamma.item() <= 1.0 for m in gammas)
    certificate = certify(model.eval())
    bn_bounds = [bound.lipschitz.item() for name, bound in certificate.layers if name.endswith(".bn")]
    assert bn_bounds and max(bn_bounds) <= 1.0


def test_radii_of_the_certified_model_are_invariant_to_batching():
    torch.manual_seed(1)
    model = timm.create_model("lcnn_resnet18", **SMALL).eval().double()
    certificate = certify(model)
    x, y = torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    together = certified_radii(model, x, y, certificate)["combined"]
    alone = torch.cat([certified_radii(model, x[i : i + 1], y[i : i + 1], certificate)["combined"] for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=0)


def test_certified_radii_never_exceed_the_evaluated_models_exact_radii():
    """A linear classifier's exact L2 radius is min_j m_j / ||w_y - w_j|| of the float64 function evaluated. The
    certificate used to bound the float32 weights while a float64 copy (sigma recomputed) was evaluated: 1e-7
    apart, and points inside some certified balls changed class (issue 23)."""
    from lcnn_timm.certify.evaluate import certified_radii_over
    from lcnn_timm.layers import spectral_norm

    torch.manual_seed(0)
    model = spectral_norm(torch.nn.Linear(20, 5), init_iterations=0).eval()  # sigma from unconverged vectors
    images = torch.randn(400, 20)
    with torch.no_grad():
        labels = model(images).argmax(1)  # every example classified correctly: every radius is positive
    _, radii = certified_radii_over(model, DataLoader(TensorDataset(images, labels), batch_size=100), model,
                                    progress=False)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits, weight = model64(images.double()), model64.weight.double()
    rows = torch.arange(len(labels))
    margins = logits[rows, labels, None] - logits
    distances = (weight[labels][:, None, :] - weight[None]).norm(dim=-1)
    exact = torch.where(margins > 0, margins / distances, torch.full_like(margins, float("inf")))
    exact[rows, labels] = float("inf")
    exact = torch.where((margins < 0).any(1), torch.zeros_like(margins[:, 0]), exact.amin(1))
    assert (radii["combined"] > 0).sum() > 300
    assert (radii["combined"] <= exact).all(), (radii["combined"] / exact).max()
