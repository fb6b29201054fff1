"""Walking and editing a module tree by (parent, attribute) slots."""
from typing import Iterator, List, NamedTuple, Set

from torch import nn

__all__ = ["Slot", "slots"]


class Slot(NamedTuple):
    """``parent.<attr>`` holds ``child``; ``name`` is the child's qualified name."""

    name: str
    parent: nn.Module
    attr: str
    child: nn.Module

    def set(self, new: nn.Module) -> None:
        setattr(self.parent, self.attr, new)


def slots(model: nn.Module) -> List[Slot]:
    """Every parent/child edge, depth first (a shared child appears once per parent slot; its subtree once)."""

    def walk(module: nn.Module, prefix: str, seen: Set[int]) -> Iterator[Slot]:
        for attr, child in module.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            yield Slot(name, module, attr, child)
            if id(child) not in seen:
                seen.add(id(child))
                yield from walk(child, name, seen)

    return list(walk(model, "", set()))
