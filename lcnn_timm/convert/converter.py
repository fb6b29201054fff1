"""``convert_model``: turn a timm (or any torch) model into a Low-Curvature Neural Network."""
import copy
import math
import types
from typing import Any, Dict, Optional, Sequence, Set, Tuple

from torch import nn

from .activations import replace_activations
from .catalog import leave_reason
from .convs import normalize_layers
from .function_preserving import absorb_spectral_scales, assess_preservation, open_gamma_clips, relative_deviation
from .fx_activations import rewrite_functional_activations
from .norms import replace_batchnorms
from .op_audit import audit_ops
from .probe import ProbeResult, probe
from .report import ConversionReport
from .scalings import find_learned_scalings

__all__ = ["convert_model"]

DEFAULT_BETA = 5.0
# large enough that the centered softplus is within log(2)/beta of a ReLU
DEFAULT_PRESERVING_BETA = 30.0


def _resolve_input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size")
        if input_size is None:
            raise ValueError(
                "convert_model needs input_size=(C, H, W): the model has no pretrained_cfg['input_size']. "
                "Pass the size the model will be trained at (spectral norms of convs depend on it)."
            )
    if len(input_size) != 3 or not all(isinstance(d, int) and d > 0 for d in input_size):
        raise ValueError(f"input_size must be (C, H, W) with positive ints, got {input_size!r}")
    return tuple(input_size)


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"convert_model: {name} must be a finite number > 0, got {value!r}")


def _audit(model: nn.Module, report: ConversionReport) -> None:
    """Report every module the conversion did not handle and that matters to the LCNN theory."""
    reported: Set[Tuple[str, str]] = {(entry.name, entry.kind) for entry in report.left_alone}
    for name, module in model.named_modules():
        found = leave_reason(module)
        if found is not None and (name or "<model>", found[0]) not in reported:
            kind, reason = found
            report.leave(name or "<model>", type(module).__name__, kind, reason)


def convert_model(
    model: nn.Module,
    input_size: Optional[Sequence[int]] = None,
    inplace: bool = False,
    beta: Optional[float] = None,
    gamma: float = 10.0,
    function_preserving: bool = False,
    init_iterations: int = 100,
    measure_deviation: bool = False,
) -> Tuple[nn.Module, ConversionReport]:
    """Convert ``model`` to an LCNN: centered softplus, gamma-BN and operator-norm spectral normalisation.

    Args:
        model: a timm (or any) image model.
        input_size: (C, H, W) the model will be trained at; default ``model.pretrained_cfg['input_size']``.
            Conv operator norms depend on the spatial size, so training at another size needs a new conversion.
        inplace: modify ``model`` itself instead of a deep copy.
        beta: initial centered-softplus beta; default 5 (the paper's), or 30 with ``function_preserving``.
        gamma: initial gamma of the gamma-BNs (in function-preserving mode, raised to each BN's Lipschitz constant).
        function_preserving: keep a pretrained model's eval function: each spectral-norm scale is absorbed by the
            BatchNorm that follows the layer, gamma clips are opened, beta defaults large (see docs/converter.md).
        init_iterations: at most this many Lanczos steps converge each new spectral norm (see ``spectral_norm``).
        measure_deviation: also measure how far the converted model's eval output is from the original's on a
            random batch (``report.preservation.deviation``); with ``inplace`` this costs a copy of the model.

    Returns:
        The converted model (a copy unless ``inplace``; a ``torch.fx.GraphModule`` only when the model's own
        ``forward`` calls a functional activation) and a :class:`ConversionReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model expects an nn.Module, got {type(model).__name__}")
    beta = (DEFAULT_PRESERVING_BETA if function_preserving else DEFAULT_BETA) if beta is None else beta
    _check_positive("beta", beta)
    _check_positive("gamma", gamma)
    if not isinstance(init_iterations, int) or init_iterations < 1:
        raise ValueError(f"convert_model: init_iterations must be an int >= 1, got {init_iterations!r}")
    input_size = _resolve_input_size(model, input_size)
    original = copy.deepcopy(model) if inplace and measure_deviation else model
    if not inplace:
        model = copy.deepcopy(model)

    report = ConversionReport()
    probed = probe(model, input_size)
    scalings = find_learned_scalings(model)  # before the conversion changes any layer's type
    settings = dict(input_size=input_size, beta=beta, gamma=gamma, init_iterations=init_iterations)
    model, gamma_bns, normalized = _convert_layers(model, probed, settings, report)
    if function_preserving:
        absorb_spectral_scales(model, probed, normalized, gamma_bns, report)
        open_gamma_clips(model, gamma)
    _audit(model, report)
    for scaling in scalings:
        report.leave(*scaling)
    audit_ops(model, input_size, report)  # after every other entry: it accounts for what they do not
    report.preservation = assess_preservation(report, _classifier_names(model), function_preserving)
    if measure_deviation:
        report.preservation.deviation = relative_deviation(original, model, input_size)
    _keep_timm_conventions(model, settings)
    return model, report


def _classifier_names(model: nn.Module) -> Set[str]:
    """Qualified names of the layers in timm's ``get_classifier()`` (none for other models)."""
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if not isinstance(head, nn.Module):
        return set()
    inside = set(head.modules())
    return {name for name, module in model.named_modules() if module in inside}


def _convert_layers(
    model: nn.Module, probed: ProbeResult, settings: Dict[str, Any], report: ConversionReport
) -> Tuple[nn.Module, Dict[nn.Module, nn.Module], Dict[nn.Module, nn.Module]]:
    """BatchNorms, activation modules, functional activations, then convs/linears: the layer conversions.

    Returns the (possibly new) root, the gamma-BN of each replaced BatchNorm and the normalised layers.
    """
    gamma_bns = replace_batchnorms(model, probed, settings["gamma"], report)
    replace_activations(model, settings["beta"], report)
    model = rewrite_functional_activations(model, settings["beta"], report)
    normalized = normalize_layers(model, probed, settings["init_iterations"], report)
    return model, gamma_bns, normalized


def _keep_timm_conventions(model: nn.Module, settings: Dict[str, Any]) -> None:
    """What timm reads from a model stays true after conversion: ``pretrained_cfg['input_size']`` is the
    conversion size (the spectral norms hold there only), and ``reset_classifier`` installs an LCNN head."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        model.pretrained_cfg = model.default_cfg = dict(cfg, input_size=settings["input_size"])
    if callable(getattr(type(model), "reset_classifier", None)):
        model._lcnn_conversion = settings
        model.reset_classifier = types.MethodType(_lcnn_reset_classifier, model)


def _lcnn_reset_classifier(self: nn.Module, num_classes: int, *args, **kwargs) -> None:
    """timm's ``reset_classifier``, then the new head converted like the rest of the model (its BatchNorms
    gamma-BNs, e.g. in levit's ``NormLinear``; its activations centered softplus; its conv/linear layers
    spectrally normalised). Bound per instance by ``convert_model``."""
    type(self).reset_classifier(self, num_classes, *args, **kwargs)
    settings = self._lcnn_conversion
    # the root is not rewritten: a model whose own forward was is a GraphModule, without reset_classifier
    _convert_layers(self, probe(self, settings["input_size"]), settings, ConversionReport())
