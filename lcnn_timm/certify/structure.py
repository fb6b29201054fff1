"""The network structure the LCNN theory covers, walked in forward order.

A model is a chain (``nn.Sequential``, or any module with a ``bound_chain()``
listing its layers in forward order) of leaves and halves residual blocks.
:func:`compose` folds per-layer values through that structure with a
:class:`Rules` object (the certified bounds and the paper's Theorem-1 quantity
use the same walk with different algebra). Anything else raises
:class:`UnsupportedStructureError` naming the first offending module and why.
"""
from typing import Generic, List, Optional, Tuple, TypeVar

from torch import nn

from ..layers.centered_softplus import CenteredSoftplus
from ..layers.gamma_batchnorm import _GammaBatchNorm
from ..layers.halves_residual import HalvesResidual
from ..layers.softplus_maxmin import SoftplusMaxMin
from ..layers.spectral_norm import is_spectral_normalized

__all__ = ["AVERAGE_POOLS", "UNIT_LEAVES", "Rules", "UnsupportedStructureError", "chain_children", "check_structure",
           "compose", "flatten_chain", "is_covered_leaf", "unsupported"]

T = TypeVar("T")
Named = Tuple[str, nn.Module]

UNIT_LEAVES = (nn.Identity, nn.Flatten, nn.Dropout)  # eval mode: the identity or a reshape
AVERAGE_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)  # linear maps with non-negative coefficients


class UnsupportedStructureError(ValueError):
    """The model contains a layer or a connection the LCNN theory does not cover."""


def runs_as_chain(module: nn.Module) -> bool:
    """True for ``nn.Sequential`` and subclasses that keep its ``forward`` (one that overrides it, e.g. to scale or
    add a residual, is not a plain chain whatever its children)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def chain_children(module: nn.Module, name: str) -> Optional[List[Named]]:
    """``module``'s layers in forward order if it is a chain, else None.

    Every entry counts, a module listed twice included (it runs twice); ``named_children()`` would skip the repeat.
    """
    if hasattr(module, "bound_chain"):  # models declare their forward order
        return [(f"{name}.{child_name}", child) for child_name, child in module.bound_chain()]
    if runs_as_chain(module):
        return [(f"{name}.{child_name}", child) for child_name, child in module._modules.items() if child is not None]
    return None


def flatten_chain(module: nn.Module, name: str) -> List[Named]:
    """The leaves and halves blocks of ``module`` in forward order, nested chains flattened."""
    children = chain_children(module, name)
    if children is None:
        return [(name, module)]
    return [item for child_name, child in children for item in flatten_chain(child, child_name)]


def is_covered_leaf(module: nn.Module) -> bool:
    """True for the leaves the theory covers (a spectrally normalised layer's parametrizations are part of it)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return is_spectral_normalized(module)
    return isinstance(module, (CenteredSoftplus, SoftplusMaxMin, _GammaBatchNorm) + UNIT_LEAVES + AVERAGE_POOLS)


def _why_outside(module: nn.Module) -> Optional[str]:
    """Why a module is outside the theory; None for covered leaves and for containers (look inside them)."""
    if is_covered_leaf(module):
        return None
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return "is not spectrally normalised, so its Lipschitz constant is not controlled"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "is a plain BatchNorm: its Lipschitz constant is not capped (use gamma-BN)"
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
        return "is max-pooling, which is not differentiable (use average pooling)"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return "normalises by input-dependent statistics, so it has no data-free Lipschitz bound"
    if isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        return "is attention, which has no global Lipschitz bound"
    if not list(module.children()):
        return ("is outside the theory (covered: centered softplus, Softplus MaxMin, gamma-BN, spectrally normalised "
                "conv/linear, average pooling, flatten, identity, dropout, halves residual blocks)")
    return None


def _first_offender(module: nn.Module, name: str) -> Optional[Tuple[str, nn.Module, str]]:
    if is_covered_leaf(module):
        return None
    reason = _why_outside(module)
    if reason is not None:
        return name, module, reason
    for child_name, child in module.named_children():
        found = _first_offender(child, f"{name}.{child_name}")
        if found is not None:
            return found
    return None


def unsupported(module: nn.Module, name: str) -> UnsupportedStructureError:
    """The error for ``module``: its first offending sub-module and why, or why its connections are unknown."""
    found = _first_offender(module, name)
    if found is not None:
        sub_name, sub, reason = found
        return UnsupportedStructureError(f"{sub_name} ({type(sub).__name__}) {reason}")
    overrides = " (an nn.Sequential subclass that overrides forward)" if isinstance(module, nn.Sequential) else ""
    return UnsupportedStructureError(
        f"{name} ({type(module).__name__}){overrides} is neither a chain nor a halves block: it has no bound_chain() "
        "giving its forward order, so its connections (e.g. residual additions) are unknown to the LCNN theory"
    )


class Rules(Generic[T]):
    """Algebra of a walk: a value per leaf and how values combine. The base class computes nothing."""

    identity: T = None

    def leaf(self, module: nn.Module, name: str) -> T:
        return self.identity

    def then(self, first: T, second: T) -> T:
        """Value of ``second o first``."""
        return self.identity

    def halves(self, residual: T, shortcut: T, block: HalvesResidual) -> T:
        """Value of ``x -> b (F(a x) + S(a x))`` (before the block's activation), ``a = block.input_scale`` and
        ``b = block.output_scale`` (``1/sqrt 2`` and ``1/2`` unless an instance sets its own)."""
        return self.identity

    def container(self, module: nn.Module, name: str) -> None:
        """Called for every chain and halves block before its children are walked (e.g. to audit it)."""


def check_structure(module: nn.Module, name: str) -> None:
    """Raise :class:`UnsupportedStructureError` for the first module outside the theory; nothing is computed."""
    compose(module, name, Rules())


def compose(module: nn.Module, name: str, rules: Rules[T]) -> T:
    """Fold ``rules`` over ``module`` in forward order."""
    if isinstance(module, HalvesResidual):
        rules.container(module, name)
        branches = rules.halves(compose(module.residual, f"{name}.residual", rules),
                                compose(module.shortcut, f"{name}.shortcut", rules), module)
        return rules.then(branches, compose(module.act, f"{name}.act", rules))
    children = chain_children(module, name)
    if children is not None:
        rules.container(module, name)
        value = rules.identity
        for child_name, child in children:
            value = rules.then(value, compose(child, child_name, rules))
        return value
    if not is_covered_leaf(module):
        raise unsupported(module, name)
    return rules.leaf(module, name)
