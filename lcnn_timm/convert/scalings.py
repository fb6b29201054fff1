"""Learned parameters that scale the signal outside the layers the LCNN theory bounds, found with torch.fx.

The theory bounds convs and linears (spectral norm), BatchNorm (gamma clip)
and activations (beta). A parameter that a forward multiplies into the signal
anywhere else (timm's ``Affine`` ``alpha``, layer-scale ``ls1``/``gamma``
vectors, learned gains, a weight fed to ``F.linear``/``matmul``) multiplies
the network's Lipschitz constant and curvature by an unbounded factor. Each
traced forward is searched for ``get_attr`` nodes of parameters and their
uses, through reshapes and elementwise functions (``exp``, ``abs``, ...): a use
as a factor of ``mul``/``div``/``addcmul`` or as the weight of a linear map is
reported; additive uses (biases, positional embeddings) are not. Forwards fx
cannot trace are reported as ``untraceable`` by the activation search instead.
"""
import operator
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .catalog import leave_reason
from .fx_activations import traced_forwards

__all__ = ["LearnedScaling", "find_learned_scalings"]

# ops whose output is (a view or an elementwise function of) their first argument: follow the parameter through
_PASS_THROUGH_METHODS = {
    "view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "to", "type_as", "contiguous", "flatten",
    "permute", "transpose", "t", "float", "double", "half", "bfloat16", "clone", "exp", "abs", "sqrt", "rsqrt",
    "neg", "reciprocal", "pow", "clamp", "clamp_min", "clamp_max", "sigmoid", "tanh", "__getitem__",
}
_PASS_THROUGH_FUNCTIONS = {
    torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.permute, torch.transpose, torch.exp,
    torch.abs, torch.sqrt, torch.rsqrt, torch.neg, torch.reciprocal, torch.pow, torch.clamp, torch.sigmoid,
    torch.tanh, F.softplus, operator.getitem, operator.neg, operator.pow,
}
# argument positions that multiply the signal
_FACTOR_METHODS = {"mul": (0, 1), "mul_": (0, 1), "div": (0, 1), "div_": (0, 1), "addcmul": (1, 2), "addcmul_": (1, 2)}
_FACTOR_FUNCTIONS: Dict[Callable, Tuple[int, ...]] = {
    operator.mul: (0, 1), operator.imul: (0, 1), operator.truediv: (0, 1), operator.itruediv: (0, 1),
    torch.mul: (0, 1), torch.div: (0, 1), torch.addcmul: (1, 2),
}
_LINEAR_MAPS: Dict[Callable, Tuple[int, ...]] = {
    F.linear: (1,), F.conv1d: (1,), F.conv2d: (1,), F.conv3d: (1,), torch.matmul: (0, 1), operator.matmul: (0, 1),
    torch.mm: (0, 1), torch.bmm: (0, 1), torch.einsum: tuple(range(1, 8)),
}
_LINEAR_MAP_METHODS = {"matmul": (0, 1), "mm": (0, 1), "bmm": (0, 1)}

SCALING_REASON = (
    "learned factor in the forward, outside the layers the LCNN theory bounds: neither normalised nor penalised"
)
LINEAR_REASON = "weight of a functional linear map (F.linear / matmul / conv call) in a forward: not normalised"


class LearnedScaling(NamedTuple):
    """A parameter ``name`` (``type_name`` = owner type.attribute) used as a factor; ``kind`` scaling or linear."""

    name: str
    type_name: str
    kind: str
    reason: str


def _positions(node: torch.fx.Node, methods: Dict[str, Tuple[int, ...]], functions: Dict[Callable, Tuple[int, ...]]):
    if node.op == "call_method":
        return methods.get(node.target, ())
    if node.op == "call_function":
        return functions.get(node.target, ())
    return ()


def _passes_through(user: torch.fx.Node, source: torch.fx.Node) -> bool:
    if not user.args or user.args[0] is not source:
        return False
    if user.op == "call_method":
        return user.target in _PASS_THROUGH_METHODS
    return user.op == "call_function" and user.target in _PASS_THROUGH_FUNCTIONS


def _use(node: torch.fx.Node) -> Optional[str]:
    """``scaling`` or ``linear`` if the value of ``node`` reaches a product with the signal, else None."""
    seen: Set[torch.fx.Node] = set()
    frontier = [node]
    while frontier:
        source = frontier.pop()
        for user in source.users:
            if user in seen:
                continue
            seen.add(user)
            args = list(user.args)
            if any(i < len(args) and args[i] is source for i in _positions(user, _LINEAR_MAP_METHODS, _LINEAR_MAPS)):
                return "linear"
            if any(i < len(args) and args[i] is source for i in _positions(user, _FACTOR_METHODS, _FACTOR_FUNCTIONS)):
                return "scaling"
            if _passes_through(user, source):
                frontier.append(user)
    return None


def find_learned_scalings(model: nn.Module) -> List[LearnedScaling]:
    """Parameters a forward uses as a factor of the signal outside convs, linears, BatchNorms and LCNN layers.

    Parameters of modules reported on their own (norms, attention, ...) and of
    ``lcnn_timm`` layers are skipped; each parameter is listed once.
    """
    found: Dict[str, LearnedScaling] = {}
    for prefix, _, graph, _ in traced_forwards(model):  # an untraceable forward is reported by the activation search
        for node in graph.nodes if graph is not None else ():
            if node.op != "get_attr":
                continue
            name = f"{prefix}.{node.target}" if prefix else node.target
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if not isinstance(getattr(owner, attr, None), nn.Parameter) or name in found:
                continue
            if type(owner).__module__.startswith("lcnn_timm.") or leave_reason(owner) is not None:
                continue
            kind = _use(node)
            if kind is not None:
                reason = SCALING_REASON if kind == "scaling" else LINEAR_REASON
                found[name] = LearnedScaling(name, f"{type(owner).__name__}.{attr}", kind, reason)
    return list(found.values())
