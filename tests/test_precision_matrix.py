"""Every precision x memory layout a user can train in, checked against float64 on any CPU.

{float32, bfloat16 autocast, float16 autocast with GradScaler} x {contiguous, channels_last}. Autocast runs
both reduced precisions on every CPU (emulated where not native, only slower), so nothing here depends on
the test machine's hardware. Tolerances are norm-wise relative errors against float64 on the same (rounded)
inputs, stated per precision: a few units of each format's rounding (2^-8 bf16, 2^-11 fp16) per layer, more
for a whole network, whose 20 layers each round.
"""
import copy

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.export import freeze
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm1d, GammaBatchNorm2d, HalvesResidual, spectral_norm
from lcnn_timm.train.parity import LAYOUTS, PRECISIONS, bn_statistics_ratio, run_cell, write_row_band_dataset

CELLS = [(p, m) for p in PRECISIONS for m in LAYOUTS]
LAYER_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 3e-3}
NETWORK_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.03}
STATISTICS_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.01}  # measured: 1e-7, 0.027, 0.0023


def _autocast(precision):
    return torch.autocast("cpu", dtype=getattr(torch, precision), enabled=precision != "float32")


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and x.dim() == 4 else x


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _run(module, x, grad, precision, layout):
    """Output and the gradients of <output, grad> w.r.t. the input and every parameter, in ``precision``."""
    module = module.to(memory_format=torch.channels_last) if layout == "channels_last" else module
    x = _layout(x.detach().clone(), layout).requires_grad_()
    with _autocast(precision):
        out = module(x)
    (out.double() * grad).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


def _input_dtype(precision, takes_autocast_activations):
    # a layer after a convolution receives autocast's dtype; one before receives float32 and autocast casts it
    return getattr(torch, precision) if takes_autocast_activations and precision != "float32" else torch.float32


def _halves():
    def unit(c):
        return nn.Sequential(spectral_norm(nn.Conv2d(c, c, 3, padding=1, bias=False), input_size=(6, 6)),
                             GammaBatchNorm2d(c, gamma=0.5))
    return HalvesResidual(nn.Sequential(unit(8), CenteredSoftplus(3.0), unit(8)), act=CenteredSoftplus(4.0))


# name: (factory, input shape, input scale, train mode, takes autocast activations)
LAYERS = {
    "centered_softplus": (lambda: CenteredSoftplus(5.0), (16, 8, 6, 6), 0.05, True, True),
    "gamma_bn2d_train": (lambda: GammaBatchNorm2d(8, gamma=0.5, affine=True), (16, 8, 6, 6), 0.1, True, True),
    "gamma_bn2d_eval": (lambda: GammaBatchNorm2d(8, gamma=0.5, affine=True), (16, 8, 6, 6), 0.1, False, True),
    "gamma_bn1d_train": (lambda: GammaBatchNorm1d(8, gamma=0.5), (16, 8), 0.1, True, True),
    "spectral_conv_train": (lambda: spectral_norm(nn.Conv2d(8, 8, 3, padding=1), input_size=(6, 6)),
                            (16, 8, 6, 6), 1.0, True, False),
    "spectral_conv_eval": (lambda: spectral_norm(nn.Conv2d(8, 8, 3, stride=2, padding=1), input_size=(6, 6)),
                           (16, 8, 6, 6), 1.0, False, False),
    "spectral_linear": (lambda: spectral_norm(nn.Linear(16, 5)), (16, 16), 1.0, True, False),
    "halves_residual": (_halves, (16, 8, 6, 6), 1.0, True, False),
}


def _eval_statistics(module):
    # eval-mode gamma-BNs: running statistics of activation scale, and a clip that acts (gamma 0.5)
    for m in module.modules():
        if isinstance(m, (GammaBatchNorm1d, GammaBatchNorm2d)):
            m.running_var.uniform_(0.005, 0.02)
            m.running_mean.normal_(0, 0.05)


@pytest.mark.parametrize("precision,layout", CELLS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_and_backward_match_float64(name, precision, layout):
    factory, shape, scale, training, after_conv = LAYERS[name]
    torch.manual_seed(0)
    module = factory().train(training)
    _eval_statistics(module)
    x = (torch.randn(shape) * scale).to(_input_dtype(precision, after_conv))
    reference = copy.deepcopy(module).double()
    with torch.no_grad():
        shape = copy.deepcopy(reference)(x.double()).shape
    grad = torch.randn(shape, dtype=torch.float64)
    out_ref, grads_ref = _run(reference, x.double(), grad, "float32", "contiguous")
    out, grads = _run(copy.deepcopy(module).float(), x, grad, precision, layout)
    tolerance = LAYER_TOLERANCE[precision]
    assert _relative(out, out_ref) < tolerance
    for got, expected in zip(grads, grads_ref):
        # in a composite, a scalar's gradient (beta, gamma) sums terms of both signs over every activation: the
        # rounding of the layers before it shows there relative to the (smaller) sum, hence ten times the bound
        scalar_in_composite = expected.dim() == 0 and name == "halves_residual"
        assert _relative(got, expected) < tolerance * (10 if scalar_in_composite else 1)



@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return timm.create_model("lcnn_resnet18", num_classes=10, img_size=8)


@pytest.mark.parametrize("precision,layout", CELLS)
def test_lcnn_resnet18_forward_and_backward_match_float64(resnet18, precision, layout):
    torch.manual_seed(1)
    x, grad = torch.rand(8, 3, 8, 8), torch.randn(8, 10, dtype=torch.float64)
    out_ref, grads_ref = _run(copy.deepcopy(resnet18).double().train(), x.double(), grad, "float32", "contiguous")
    out, grads = _run(copy.deepcopy(resnet18).train(), x, grad, precision, layout)
    tolerance = NETWORK_TOLERANCE[precision]
    assert _relative(out, out_ref) < tolerance
    assert _relative(grads[0], grads_ref[0]) < tolerance  # the input gradient
    # the weights' gradients as one vector (scalars excluded: see the halves block above)
    weights = [(g, e) for g, e in zip(grads[1:], grads_ref[1:]) if e.dim() > 0]
    assert _relative(torch.cat([g.flatten() for g, _ in weights]), torch.cat([e.flatten() for _, e in weights])) < tolerance


@pytest.mark.parametrize("precision,layout", CELLS)
def test_the_trained_network_is_the_evaluated_network(precision, layout):
    """The root of issue 22: gamma-BN's clip in training read the running variance, which BN starts at 1 and which
    lags activations of variance ~1e-3 for hundreds of steps, so the network trained with its clips open and was
    evaluated (after the statistics caught up, or precise BN) with them closed. A fresh network's training-mode
    output must equal its eval-mode output once the running statistics are this batch's."""
    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet18_025", num_classes=4, in_chans=1, img_size=8)
    model = model.to(memory_format=torch.channels_last) if layout == "channels_last" else model
    x = _layout(torch.rand(256, 1, 8, 8), layout)
    bns = [m for m in model.modules() if isinstance(m, GammaBatchNorm2d)]
    with torch.no_grad(), _autocast(precision):
        trained = model.train()(x).float()  # default momentum: the running variances still lag
        assert min(bn.running_var.min().item() for bn in bns) > 0.5
        for bn in bns:  # precise BN: this batch's statistics
            bn.reset_running_stats()
            bn.momentum = None
        model(x)
        evaluated = model.eval()(x).float()
    # unbiased (running) against biased (batch) variance: n/(n-1) with n >= 256 values per channel
    assert _relative(evaluated, trained) < 0.01 + NETWORK_TOLERANCE[precision] / 4


@pytest.fixture(scope="module")
def cell_runs(tmp_path_factory):
    """One short lcnn-timm training run (lcnn_resnet18_025, 64 steps, precise BN) per cell, from one seed."""
    data = write_row_band_dataset(tmp_path_factory.mktemp("rows"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same reductions in every run
    try:
        runs = {}
        for precision, layout in CELLS:
            out = tmp_path_factory.mktemp(f"{precision}_{layout}")
            trainer, result, _ = run_cell(data, out, precision, layout)
            runs[precision, layout] = (trainer, result, out)
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("precision,layout", CELLS)
def test_training_in_every_cell_agrees_with_float32(cell_runs, precision, layout):
    """Training steps, spectral-norm convergence and BN re-estimation (precise BN), the saved weights, their
    reload, evaluation in the cell's precision and the frozen export: each agrees with the float32 run's."""
    reference_trainer, reference, reference_dir = cell_runs["float32", "contiguous"]
    trainer, result, out = cell_runs[precision, layout]
    assert result["precision"] == precision
    assert reference["test_acc"] == 1.0 and result["test_acc"] >= 0.95  # learnt, like float32
    assert result["normalized_layer_norm_max"] == pytest.approx(1.0, abs=1e-4)  # converged in every cell
    # BN re-estimation (the step that went wrong in issue 22, where it left variances 10-30x too small): the cell's
    # statistics equal float32's re-estimation of the same weights on the same batches, within rounding
    ratios = bn_statistics_ratio(trainer, reference_trainer)
    assert 1 - STATISTICS_TOLERANCE[precision] < ratios.min() and ratios.max() < 1 + STATISTICS_TOLERANCE[precision], \
        (ratios.min(), ratios.max())
    # the checkpoint round trip: the saved file is the trained model, and a fresh model loads it exactly
    model = timm.create_model("lcnn_resnet18_025", num_classes=4, in_chans=1, img_size=8)
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    trained = trainer.model.state_dict()
    assert all(torch.equal(v, trained[k].contiguous()) for k, v in model.state_dict().items())
    # evaluation: in the cell's precision as in float32, and the frozen export gives the eval model's logits
    loader = trainer._eval_loader(*trainer.full_val)
    in_cell = trainer.evaluate(loader, model=model)
    with torch.no_grad():
        batch = next(iter(loader))[0].float().contiguous()
        logits = model.eval()(batch)
        frozen = freeze(model)(batch)
    assert in_cell["acc"] == pytest.approx(result["test_acc"], abs=1 / 64)
    assert _relative(frozen, logits) < 1e-4
