"""Functional activations (``F.relu(x)``, ``x.relu()``, ...) found with torch.fx and rewritten as modules.

Tracing honours timm's leaf-module and auto-wrapped-function lists
(``timm.layers._fx``) as timm's own feature extractor does, and also keeps every
layer the converter handles as a leaf, so their parameters stay inside real
modules. Only the smallest modules whose own forward calls a functional
activation are replaced by the rewritten ``torch.fx.GraphModule``; the rest of
the model keeps its classes and methods. A forward that cannot be traced is
reported, and its children are searched one by one.
"""
from typing import List, Set

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
)
from .report import ConversionReport

__all__ = ["LeafTracer", "rewrite_functional_activations"]

_CONVERTER_LEAVES = ACTIVATIONS + GATES + PLAIN_CONVS + STANDARDIZED_CONVS + LINEARS + PLAIN_BATCHNORMS + FUSED_BATCHNORM_ACTS


class LeafTracer(torch.fx.Tracer):
    """fx tracer with timm's leaf modules and auto-wrapped functions, plus the converter's layer types."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in timm_fx.get_notrace_functions() if callable(f)))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        kind = type(module)
        return kind in _CONVERTER_LEAVES or timm_fx.is_notrace_module(kind) or super().is_leaf_module(module, qualified_name)


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


def _search(module: nn.Module, prefix: str, report: ConversionReport, owners: Set[str]) -> None:
    """Collect the owners of functional activations under ``module``; report gates and untraceable forwards."""
    try:
        graph = LeafTracer().trace(module)
    except Exception as error:  # fx raises many types for data-dependent control flow
        report.leave(
            prefix or "<model>",
            type(module).__name__,
            "untraceable",
            f"forward not traceable by torch.fx ({type(error).__name__}); its own functional activations were not searched",
        )
        for name, child in module.named_children():
            _search(child, f"{prefix}.{name}" if prefix else name, report, owners)
        return
    for node in graph.nodes:
        if _is_activation(node):
            owners.add(_owner(node, prefix))
        elif _is_gate(node):
            report.leave(f"{_owner(node, prefix) or '<model>'}:{node.name}", _op_name(node), "gate", "functional gate, left alone")
        elif node.op == "call_function" and node.target in FUNCTIONAL_MAX_POOLS:
            report.leave(f"{_owner(node, prefix) or '<model>'}:{node.name}", _op_name(node), "pool", MAX_POOL_REASON)


def _outermost(owners: Set[str]) -> List[str]:
    """Owners not inside another owner (an owner's graph inlines the forwards it traces through)."""
    ordered = sorted(owners, key=lambda name: name.count(".") if name else -1)
    kept: List[str] = []
    for name in ordered:
        if not any(parent == "" or name.startswith(parent + ".") for parent in kept):
            kept.append(name)
    return kept


def _rewrite(module: nn.Module, owner: str, beta: float, report: ConversionReport) -> torch.fx.GraphModule:
    """Trace ``module`` and replace each functional activation by a new CenteredSoftplus submodule."""
    rewritten = torch.fx.GraphModule(module, LeafTracer().trace(module), class_name=f"{type(module).__name__}LCNN")
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
            # later readers of the input saw it modified in place
            source.replace_all_uses_with(
                replacement, delete_user_cb=lambda user: user is not replacement and order.get(user, -1) > order[node]
            )
        graph.erase_node(node)
        report.replace(f"{owner or '<model>'}:{node.name}", _op_name(node), f"CenteredSoftplus ({target})")
    rewritten.recompile()
    rewritten.train(module.training)
    return rewritten


def rewrite_functional_activations(model: nn.Module, beta: float, report: ConversionReport) -> nn.Module:
    """Rewrite functional activations into CenteredSoftplus modules; returns the (possibly new) root module."""
    owners: Set[str] = set()
    _search(model, "", report, owners)
    for owner in _outermost(owners):
        rewritten = _rewrite(model.get_submodule(owner), owner, beta, report)
        if not owner:
            report.leave("<model>", type(model).__name__, "note", "the model's own forward was rewritten: it is now a torch.fx.GraphModule")
            model = rewritten
            continue
        parent_name, _, attr = owner.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, rewritten)
    return model
