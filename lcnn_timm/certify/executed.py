"""Certify what runs: a module is bounded by the rule of its class only if what executes is that rule's function.

:mod:`.structure` decides which rule applies to a module from its class (and a model's ``bound_chain()``). A class
name alone cannot say what runs: a subclass with its own ``forward``, a ``forward`` replaced on the instance, a
hook, or an attribute changed after set-up (a conv's padding after its spectral norm was computed) all keep the
name and change the function. Two independent checks close that gap before a certificate is issued:

* :func:`audit_execution` (static): no forward or backward hooks (module or global); every walked module is
  *exactly* a supported class (after unwrapping ``torch.nn.utils.parametrize``), with no method shadowed on the
  instance; a model's own ``bound_chain()`` is trusted only for lcnn_timm's classes; a conv's geometry equals the
  operator its norm was computed and bounded for; pooling coefficients are non-negative; a flatten keeps the
  batch dimension.
* :func:`differential_check` (behavioural): certify's own composition of the leaves' functions (convs applied
  with the bounded operator's geometry, every other leaf through its class's ``forward``, halves blocks as
  ``b (F(a x) + S(a x))``, chains in ``bound_chain()`` order) is evaluated in float64 on random inputs of the
  certified size and compared with ``model(x)``; any difference beyond rounding refuses the certificate.

Both raise :class:`~.structure.UnsupportedStructureError` naming the module and the reason.
"""
import copy
import inspect
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils.parametrize import is_parametrized, type_before_parametrizations

from ..layers.centered_softplus import CenteredSoftplus
from ..layers.gamma_batchnorm import GammaBatchNorm1d, GammaBatchNorm2d
from ..layers.halves_residual import HalvesResidual
from ..layers.softplus_maxmin import SoftplusMaxMin
from ..layers.spectral_norm import _check_input, _norm_and_input, is_spectral_normalized, operator_for
from .structure import Rules, UnsupportedStructureError, compose

__all__ = ["DIFFERENTIAL_TOLERANCE", "EXACT_LEAVES", "audit_execution", "check_no_hooks", "differential_check",
           "non_float64_dtypes"]

# the leaf classes whose rule certify applies, matched exactly: a subclass can change what runs without a new forward
# (a method forward calls, a property the rule reads), so it is refused rather than trusted
EXACT_LEAVES = (nn.Conv2d, nn.Linear, CenteredSoftplus, SoftplusMaxMin, GammaBatchNorm1d, GammaBatchNorm2d,
                nn.Identity, nn.Flatten, nn.Dropout, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
# relative difference between model(x) and the certified chain, in float64, above which the certificate is refused
# (the two differ only by the order of float64 roundings, ~1e-15 per layer; a tampering changes outputs at O(1))
DIFFERENTIAL_TOLERANCE = 1e-8
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")
# hooks known to return None without touching their arguments: spectral_norm's input-size check
_CHECK_ONLY_HOOKS = (_check_input,)


def check_no_hooks(model: nn.Module) -> None:
    """Refuse a model any of whose modules carries a forward, forward-pre, backward or backward-pre hook, or any
    such global hook (``torch.nn.modules.module.register_module_forward_hook`` and kin): a hook can change an
    output or an input gradient without changing any class."""
    for attribute in _GLOBAL_HOOK_DICTS:
        if getattr(torch_module, attribute, None):
            raise UnsupportedStructureError(
                f"a global module hook is registered (torch.nn.modules.module.{attribute}): it can change what every "
                "module returns, so no certificate is issued while it is registered")
    for name, module in model.named_modules():
        for attribute in _HOOK_DICTS:
            if any(hook not in _CHECK_ONLY_HOOKS for hook in getattr(module, attribute, {}).values()):
                raise UnsupportedStructureError(
                    f"{name or type(model).__name__} ({type(module).__name__}) has {attribute.strip('_')[:-1]}s "
                    "registered: a hook can change what the module returns, so it is not the function certified")


def _shadowed_method(module: nn.Module) -> Optional[str]:
    """The name of a method (``forward`` included) that the instance overrides with an attribute of its own."""
    for key in vars(module):
        if key == "forward" or inspect.isroutine(getattr(type(module), key, None)):
            return key
    return None


def _is_package_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "lcnn_timm"


def _exact_class_problem(module: nn.Module, accepted: Tuple[type, ...]) -> Optional[str]:
    """Why ``module`` is not exactly one of ``accepted`` (a parametrized module counts as its original class)."""
    cls = type_before_parametrizations(module)
    if is_parametrized(module) and type(module).forward is not cls.forward:
        return "is a parametrized class with a forward of its own"
    if cls in accepted:
        return None
    base = next((b for b in accepted if isinstance(module, b)), None)
    if base is None:  # compose only reaches covered leaves; kept as a guard for new leaf kinds
        return "is not a class certify has a rule for"
    return (f"subclasses {base.__name__}: certify accepts only {base.__name__} itself, whose forward its rule "
            "models (a subclass can run something else under the same name)")


def _geometry_problem(module: nn.Module) -> Optional[str]:
    """Why a leaf's settings differ from the function its bound was computed for, or None."""
    if isinstance(module, nn.Conv2d) and is_spectral_normalized(module):
        bounded = _norm_and_input(module)[0].operator
        try:
            runs = operator_for(module, bounded.input_size)
        except ValueError as error:
            return f"cannot be bounded as it is now set up: {error}"
        if runs != bounded:
            return (f"runs with geometry {runs} but its norm was computed and is bounded for {bounded} (stride, "
                    "padding, dilation or groups changed after spectral_norm): re-apply spectral_norm")
    if isinstance(module, nn.AvgPool2d) and module.divisor_override is not None and module.divisor_override <= 0:
        return (f"has divisor_override={module.divisor_override}: its coefficients are not all non-negative, which "
                "the pooling bound (Schur test) assumes")
    if isinstance(module, nn.Flatten) and module.start_dim < 1:
        return f"flattens from dimension {module.start_dim}, mixing examples of a batch (start_dim must be >= 1)"
    return None


class _AuditRules(Rules[None]):
    """Visits every module certify walks and refuses the first whose execution can differ from its rule."""

    def leaf(self, module: nn.Module, name: str) -> None:
        problem = _exact_class_problem(module, EXACT_LEAVES) or _geometry_problem(module)
        if problem is None and isinstance(module, SoftplusMaxMin):  # its rule reads the inner activation's beta
            inner = _exact_class_problem(module.act, (CenteredSoftplus,))
            problem = None if inner is None else f"has an inner activation that {inner}"
        self._refuse_if(problem, module, name)

    def container(self, module: nn.Module, name: str) -> None:
        if _is_package_class(type(module)):  # lcnn_timm's own chains and models: their forward is the listed chain
            return
        if hasattr(module, "bound_chain"):
            problem = ("declares bound_chain() but is not one of lcnn_timm's classes, so nothing ties the layers it "
                       "lists to what its forward runs")
        else:
            problem = _exact_class_problem(module, (HalvesResidual, nn.Sequential))
        self._refuse_if(problem, module, name)

    @staticmethod
    def _refuse_if(problem: Optional[str], module: nn.Module, name: str) -> None:
        if problem is not None:
            raise UnsupportedStructureError(f"{name} ({type(module).__name__}) {problem}")


def audit_execution(model: nn.Module, name: str) -> None:
    """Refuse (:class:`UnsupportedStructureError`) a model whose executed function can differ from the one its
    structure is certified as: hooks, subclasses, methods replaced on an instance, changed conv geometry, pooling
    with negative coefficients, a batch-mixing flatten (module docstring)."""
    check_no_hooks(model)
    for module_name, module in model.named_modules():  # also the modules inside leaves (e.g. parametrizations)
        shadowed = _shadowed_method(module)
        if shadowed is not None:
            raise UnsupportedStructureError(
                f"{module_name or name} ({type(module).__name__}) has its method {shadowed}() replaced on the "
                "instance, so it does not run its class's code")
    compose(model, name, _AuditRules())


Function = Callable[[torch.Tensor], torch.Tensor]


class _ExecutedRules(Rules[Function]):
    """Certify's composition of the leaves' functions: the function the bounds are about."""

    def __init__(self):
        self.identity: Function = lambda x: x

    def leaf(self, module: nn.Module, name: str) -> Function:
        if isinstance(module, nn.Conv2d):  # the operator the bound is of, not the module's current settings
            operator = _norm_and_input(module)[0].operator
            return lambda x: F.conv2d(F.pad(x, operator.padding), module.weight, module.bias, operator.stride, 0,
                                      operator.dilation, operator.groups)
        # the forward of the class whose rule bounds it: no hooks, no instance override, no subclass's own code
        rule_class = next(cls for cls in EXACT_LEAVES if isinstance(module, cls))
        return lambda x: rule_class.forward(module, x)

    def then(self, first: Function, second: Function) -> Function:
        return lambda x: second(first(x))

    def halves(self, residual: Function, shortcut: Function, block: HalvesResidual) -> Function:
        a, b = block.input_scale, block.output_scale  # the values the bound reads
        return lambda x: (residual(x * a) + shortcut(x * a)) * b


def _probe_inputs(input_shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Four float64 inputs of ``input_shape``: in [0, 1] (images), N(0, 1), N(0, 100) and N(0, 1e-4) (the
    activations' saturated and near-zero regimes); the same every call."""
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(1, *input_shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, *input_shape, generator=generator, dtype=torch.float64)
    scales = torch.tensor([1.0, 10.0, 0.01], dtype=torch.float64).view(-1, *[1] * len(input_shape))
    return torch.cat([uniform, noise * scales]).to(device)


def non_float64_dtypes(model: nn.Module, *tensors: torch.Tensor) -> List[str]:
    """The floating dtypes other than float64 among ``model``'s parameters and buffers and ``tensors``, sorted."""
    return sorted({str(t.dtype) for t in [*tensors, *model.parameters(), *model.buffers()]
                   if t.is_floating_point() and t.dtype != torch.float64})


def _float64_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double() if non_float64_dtypes(model) else model


@torch.no_grad()
def differential_check(model: nn.Module, input_shape: Tuple[int, ...], name: str) -> float:
    """Compare ``model(x)`` with certify's own composition of its leaves on random float64 inputs of
    ``input_shape``; returns the largest relative difference, and refuses one above
    :data:`DIFFERENTIAL_TOLERANCE` (or a non-finite output)."""
    model = _float64_model(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = _probe_inputs(tuple(input_shape), device)
    chain = compose(model, name, _ExecutedRules())(x)
    executed = model(x)
    if executed.shape != chain.shape:
        raise UnsupportedStructureError(
            f"{name}: model(x) has shape {tuple(executed.shape)} but the chain certify bounds gives "
            f"{tuple(chain.shape)}: the model does not run the layers it is certified as")
    if not (torch.isfinite(executed).all() and torch.isfinite(chain).all()):
        raise UnsupportedStructureError(f"{name}: non-finite outputs on the differential check's inputs")
    scale = chain.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
    relative = float((executed - chain).abs().amax() / scale)
    if relative > DIFFERENTIAL_TOLERANCE:
        raise UnsupportedStructureError(
            f"{name}: model(x) differs from the chain certify bounds by {relative:.3g} (relative) on random inputs: "
            "something in the forward pass is not the certified function (a replaced forward, a module that "
            "reorders or rescales), so no certificate is issued")
    return relative

