"""What actually runs: the activation and max-pooling ops of one forward of the converted model.

The module catalog and the fx search find only what they know how to look for:
a functional activation inside a forward fx does not enter (timm's no-trace
modules), an activation class the catalog does not list, a ``clamp(min=0)``
written out by hand. This audit runs one eval forward under a
``TorchDispatchMode`` and records every ATen op below that ran, attributed to
the innermost module whose forward called it. ``report.fully_converted`` then
rests on what executed: an op whose module is not reported for it is added to
the report.
"""
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .catalog import MAX_POOL_REASON, is_lcnn_layer
from .probe import run_once
from .report import ConversionReport

__all__ = ["ACTIVATION_OPS", "POOL_OPS", "audit_ops", "count_ops"]

# ATen ops (in-place ``_`` variants included) that a ReLU-family or piecewise-linear activation runs as; relu6
# reaches ATen as hardtanh, selu and celu as elu, prelu as _prelu_kernel, rrelu as rrelu_with_noise (checked on CPU)
ACTIVATION_OPS = frozenset({
    "relu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "threshold", "leaky_relu", "elu",
    "_prelu_kernel", "rrelu_with_noise", "softplus",
})
POOL_OPS = frozenset({"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
                      "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"})
_CLAMPS = frozenset({"clamp", "clamp_min", "clamp_max"})


def _op_name(func) -> str:
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _is_kink_clamp(name: str, args: tuple, kwargs: dict) -> bool:
    """A clamp with a scalar bound at 0 (``clamp(min=0)``, ``clamp(0, 6)``): a ReLU written as a clamp."""
    if name not in _CLAMPS:
        return False
    bounds = list(args[1:]) + [kwargs.get("min"), kwargs.get("max")]
    return any(isinstance(b, (int, float)) and not isinstance(b, bool) and b == 0 for b in bounds)


class _OpRecorder(TorchDispatchMode):
    """Counts the audited ops per innermost running module (``stack[-1]``)."""

    def __init__(self, stack: List[Tuple[str, nn.Module]]):
        super().__init__()
        self.stack = stack
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in ACTIVATION_OPS or name in POOL_OPS or _is_kink_clamp(name, args, kwargs):
            owner, module = self.stack[-1] if self.stack else ("", None)
            # the converter's own layers run clamps and softplus pieces by design (centered softplus, gamma clip)
            if not is_lcnn_layer(module):
                self.counts[owner, f"aten::{name}"] += 1
        return func(*args, **kwargs)


def count_ops(model: nn.Module, input_size: Sequence[int]) -> Counter:
    """``{(module name, 'aten::op'): times}`` for the audited ops of one eval forward on a random input.

    The module is the innermost one whose forward was running ("" for the model's own forward); ops inside the
    converter's own layers are not counted.
    """
    names = {module: name for name, module in model.named_modules()}
    stack: List[Tuple[str, nn.Module]] = []

    def enter(module: nn.Module, args) -> None:
        stack.append((names[module], module))

    def leave(module: nn.Module, args, output) -> None:  # returns None: the output is kept
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names]
    handles += [m.register_forward_hook(leave) for m in names]
    recorder = _OpRecorder(stack)
    try:
        with recorder:
            run_once(model, input_size)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.counts


def _reported_kinds(report: ConversionReport) -> Dict[str, set]:
    """Module name -> kinds it is reported under (an fx entry ``owner:node`` counts for ``owner``)."""
    kinds: Dict[str, set] = {}
    for entry in report.left_alone:
        owner = entry.name.split(":")[0]
        kinds.setdefault("" if owner == "<model>" else owner, set()).add(entry.kind)
    return kinds


def audit_ops(model: nn.Module, input_size: Sequence[int], report: ConversionReport) -> None:
    """Record what ran in ``report.executed_ops`` and report each op whose module is not reported for it.

    An activation op is accounted for by an ``activation`` or ``gate`` entry of its module, a max-pooling op by
    a ``pool`` entry. Anything else is added: an activation as ``activation`` (so the model is not fully
    converted), a max pool as ``pool``.
    """
    counts = count_ops(model, input_size)
    reported = _reported_kinds(report)
    for (owner, op), times in sorted(counts.items()):
        report.executed_ops[op] += times
        pool = op.removeprefix("aten::") in POOL_OPS
        accepted = {"pool"} if pool else {"activation", "gate"}
        if reported.get(owner, set()) & accepted:
            continue
        type_name = type(model.get_submodule(owner)).__name__
        if pool:
            report.leave(owner or "<model>", type_name, "pool", f"{op} ran {times}x: {MAX_POOL_REASON}")
        else:
            report.leave(owner or "<model>", type_name, "activation",
                         f"{op} ran {times}x in its forward after conversion: not converted (found by the op audit)")
