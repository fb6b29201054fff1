"""Functional activations (``F.relu(x)``, ``x.relu()``, ...) found with torch.fx and rewritten as modules.

Tracing honours timm's leaf-module and auto-wrapped-function lists
(``timm.layers._fx``) as timm's own feature extractor does, and also keeps every
layer the converter handles as a leaf, so their parameters stay inside real
modules. timm's no-trace leaves are then traced on their own (a functional
activation in mobilevitv2's ``LinearSelfAttention`` or dm_nfnet's ``GammaAct``
sits below one). Only the smallest modules whose own forward calls a functional
activation are replaced by the rewritten ``torch.fx.GraphModule``; the rest of
the model keeps its classes and methods. A forward that cannot be traced is
reported, and its children are searched one by one.
"""
import inspect
from typing import Iterator, List, NamedTuple, Optional, Set

import torch
import torch.fx
from timm.layers import _fx as timm_fx
from torch import nn

from ..layers.centered_softplus import CenteredSoftplus
from .catalog import (
    ACTIVATIONS,
    FUNCTIONAL_ACTIVATION_METHODS,
    FUNCTIONAL_ACTIVATIONS,
    FUNCTIONAL_GATE_METHODS,
    FUNCTIONAL_GATES,
    FUNCTIONAL_MAX_POOLS,
    FUSED_BATCHNORM_ACTS,
    MAX_POOL_REASON,
    GATES,
    LINEARS,
    PLAIN_BATCHNORMS,
    PLAIN_CONVS,
    STANDARDIZED_CONVS,
    is_lcnn_layer,
)
from .report import ConversionReport

__all__ = ["LeafTracer", "Traced", "rewrite_functional_activations", "traced_forwards"]

_CONVERTER_LEAVES = ACTIVATIONS + GATES + PLAIN_CONVS + STANDARDIZED_CONVS + LINEARS + PLAIN_BATCHNORMS + FUSED_BATCHNORM_ACTS


class LeafTracer(torch.fx.Tracer):
    """fx tracer with timm's leaf modules and auto-wrapped functions, plus the converter's layer types."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in timm_fx.get_notrace_functions() if callable(f)))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        kind = type(module)
        return kind in _CONVERTER_LEAVES or timm_fx.is_notrace_module(kind) or super().is_leaf_module(module, qualified_name)


def _trace(module: nn.Module) -> torch.fx.Graph:
    """``module``'s forward traced with :class:`LeafTracer`.

    If that fails, once more with the parameters that default to None fixed at None: fx would trace them as
    values and take the branch for a given one (``LinearSelfAttention(x, x_prev=None)`` took cross-attention and
    failed). A graph traced so asserts at run time that they are None.
    """
    try:
        return LeafTracer().trace(module)
    except Exception as error:  # fx raises many types for data-dependent control flow
        optional = {name: None for name, parameter in inspect.signature(module.forward).parameters.items()
                    if parameter.default is None}
        if not optional:
            raise
        try:
            return LeafTracer().trace(module, concrete_args=optional)
        except Exception:
            raise error from None


class Traced(NamedTuple):
    """The traced forward of module ``prefix``, or ``graph`` None and the ``error`` fx raised."""

    prefix: str
    module: nn.Module
    graph: Optional[torch.fx.Graph]
    error: Optional[Exception]


def _is_notrace_leaf(module: nn.Module) -> bool:
    return type(module) not in _CONVERTER_LEAVES and timm_fx.is_notrace_module(type(module))


def traced_forwards(module: nn.Module, prefix: str = "") -> Iterator[Traced]:
    """``module``'s traced forward, then those of the timm no-trace leaves in it (fx does not enter them).

    Where a forward cannot be traced, its children are traced one by one instead; containers without a forward
    (``ModuleList``) are entered, and the converter's own layers are skipped (they are converted already).
    """
    if is_lcnn_layer(module):
        return
    if type(module).forward is nn.Module.forward:
        graph = None
    else:
        try:
            graph, error = _trace(module), None
        except Exception as failure:  # fx raises many types for data-dependent control flow
            graph, error = None, failure
        yield Traced(prefix, module, graph, error)
    if graph is None:
        children = list(module.named_children())
    else:
        children = [(node.target, module.get_submodule(node.target)) for node in graph.nodes
                    if node.op == "call_module" and _is_notrace_leaf(module.get_submodule(node.target))]
    for name, child in children:
        yield from traced_forwards(child, f"{prefix}.{name}" if prefix else name)


def _target_name(node: torch.fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _op_name(node: torch.fx.Node) -> str:
    return f".{node.target}()" if node.op == "call_method" else f"{_target_name(node)}()"


def _is_activation(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in FUNCTIONAL_ACTIVATIONS
    return node.op == "call_method" and node.target in FUNCTIONAL_ACTIVATION_METHODS


def _is_gate(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in FUNCTIONAL_GATES
    return node.op == "call_method" and node.target in FUNCTIONAL_GATE_METHODS


def _owner(node: torch.fx.Node, prefix: str) -> str:
    """Qualified name of the innermost module whose forward made this call."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    inner = stack[-1][0] if stack else ""
    return ".".join(part for part in (prefix, inner) if part)


def _search(model: nn.Module, report: ConversionReport, owners: Set[str]) -> None:
    """Collect the owners of functional activations in ``model``; report gates, max pools and untraceable forwards.

    A timm no-trace module fx cannot trace is a ``note``, not ``untraceable``: timm already declares it so, its
    children are searched, and the op audit (``op_audit``) accounts for the activations that run in it.
    """
    for traced in traced_forwards(model):
        prefix = traced.prefix
        if traced.graph is None:
            what = type(traced.error).__name__
            if _is_notrace_leaf(traced.module):
                report.leave(prefix or "<model>", type(traced.module).__name__, "note",
                             f"timm no-trace module, not traceable by torch.fx ({what}): its children were searched, "
                             "the activations that ran were audited; learned scalings in its own forward were not")
            else:
                report.leave(prefix or "<model>", type(traced.module).__name__, "untraceable",
                             f"forward not traceable by torch.fx ({what}); its own functional activations were not "
                             "searched")
            continue
        for node in traced.graph.nodes:
            where = f"{_owner(node, prefix) or '<model>'}:{node.name}"
            if _is_activation(node):
                owners.add(_owner(node, prefix))
            elif _is_gate(node):
                report.leave(where, _op_name(node), "gate", "functional gate, left alone")
            elif node.op == "call_function" and node.target in FUNCTIONAL_MAX_POOLS:
                report.leave(where, _op_name(node), "pool", MAX_POOL_REASON)


def _outermost(owners: Set[str]) -> List[str]:
    """Owners not inside another owner (an owner's graph inlines the forwards it traces through)."""
    ordered = sorted(owners, key=lambda name: name.count(".") if name else -1)
    kept: List[str] = []
    for name in ordered:
        if not any(parent == "" or name.startswith(parent + ".") for parent in kept):
            kept.append(name)
    return kept


def _redirect_later_reads(value: torch.fx.Node, new: torch.fx.Node, after: torch.fx.Node, order: dict) -> None:
    """Uses of ``value`` that come after node ``after`` (in the original order) read ``new`` instead."""
    value.replace_all_uses_with(
        new, delete_user_cb=lambda user: user is not new and order.get(user, -1) > order[after]
    )


def _rewrite(module: nn.Module, owner: str, beta: float, report: ConversionReport) -> torch.fx.GraphModule:
    """Trace ``module`` and replace each functional activation by a new CenteredSoftplus submodule."""
    rewritten = torch.fx.GraphModule(module, _trace(module), class_name=f"{type(module).__name__}LCNN")
    graph = rewritten.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    device = next(module.parameters(), torch.empty(0)).device
    count = 0
    for node in list(graph.nodes):
        if not _is_activation(node):
            continue
        target = f"lcnn_act_{count}"
        count += 1
        rewritten.add_submodule(target, CenteredSoftplus(beta).to(device))
        source = node.args[0]
        with graph.inserting_after(node):
            replacement = graph.call_module(target, (source,))
        node.replace_all_uses_with(replacement)
        if _target_name(node).endswith("_") or node.kwargs.get("inplace", False):
            _redirect_later_reads(source, replacement, node, order)  # they saw the input modified in place
        for user in list(replacement.users):
            if user.op == "call_method" and user.target.endswith("_") and user.args[0] is replacement:
                # CenteredSoftplus's backward keeps its output: modifying it in place (GammaAct's
                # ``act(x).mul_(gamma)``) would fail the backward, so the op runs out of place
                user.target = user.target[:-1]
                _redirect_later_reads(replacement, user, user, order)
        graph.erase_node(node)
        report.replace(f"{owner or '<model>'}:{node.name}", _op_name(node), f"CenteredSoftplus ({target})")
    rewritten.recompile()
    rewritten.train(module.training)
    return rewritten


def rewrite_functional_activations(model: nn.Module, beta: float, report: ConversionReport) -> nn.Module:
    """Rewrite functional activations into CenteredSoftplus modules; returns the (possibly new) root module."""
    owners: Set[str] = set()
    _search(model, report, owners)
    for owner in _outermost(owners):
        rewritten = _rewrite(model.get_submodule(owner), owner, beta, report)
        if not owner:
            report.leave("<model>", type(model).__name__, "note", "the model's own forward was rewritten: it is now a torch.fx.GraphModule")
            model = rewritten
            continue
        parent_name, _, attr = owner.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, rewritten)
    return model
