"""What a conversion changed, and what it left alone and why."""
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

__all__ = [
    "ConversionReport", "Replacement", "LeftAlone", "Compensation", "Preservation", "FULLY_CONVERTED_MEANS",
    "UNCONVERTED_KINDS",
]

# Kinds of left-alone entries that mean the model is NOT a complete LCNN: a
# ReLU-family activation, a BatchNorm, an un-normalised conv/linear or a learned
# scaling (layer scale, ``Affine``) remains, or a forward could not be searched.
# The other kinds (norm, attention, pool, gate, note) are reported but do not
# count: the conversion has no LCNN form for them.
UNCONVERTED_KINDS = ("activation", "batchnorm", "conv", "linear", "scaling", "untraceable")
FULLY_CONVERTED_MEANS = (
    "every ReLU-family activation, BatchNorm, conv/linear and learned scaling is in LCNN form "
    "and every forward was searched"
)


@dataclass(frozen=True)
class Replacement:
    """``name`` (qualified module name or fx node) was ``old`` and is now ``new``."""

    name: str
    old: str
    new: str


@dataclass(frozen=True)
class LeftAlone:
    """``name`` (of type ``type_name``) was not converted; ``kind`` classifies it, ``reason`` says why."""

    name: str
    type_name: str
    kind: str
    reason: str


@dataclass(frozen=True)
class Compensation:
    """Function-preserving mode: how the spectral-norm scale ``sigma`` of layer ``name`` was handled.

    ``absorbed_by`` is the BatchNorm that absorbed it exactly, or empty when the
    layer's output is now ``1 / sigma`` times the original one.
    """

    name: str
    sigma: float
    absorbed_by: str


@dataclass
class Preservation:
    """Whether the conversion is expected to keep the model's eval function, why, and (when measured) by how much.

    ``deviation`` is ``max |converted(x) - original(x)| / max |original(x)|`` on a random eval batch, or None.
    """

    expected: bool
    reason: str
    deviation: Optional[float] = None

    def __str__(self) -> str:
        measured = "" if self.deviation is None else f"; measured deviation {self.deviation:.3g}"
        return f"function preservation {'expected' if self.expected else 'NOT expected'}: {self.reason}{measured}"


def _counts(entries: Iterable[LeftAlone]) -> str:
    """``"2 gate, 1 pool"``: entries per kind."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(e.kind for e in entries).items()))


@dataclass
class ConversionReport:
    """Result of :func:`lcnn_timm.convert_model`."""

    replaced: List[Replacement] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)
    compensations: List[Compensation] = field(default_factory=list)
    # activation and max-pooling ATen ops that ran in one forward after conversion (``op_audit``), by op
    executed_ops: Counter = field(default_factory=Counter)
    preservation: Optional[Preservation] = None

    def replace(self, name: str, old: str, new: str) -> None:
        self.replaced.append(Replacement(name, old, new))

    def leave(self, name: str, type_name: str, kind: str, reason: str) -> None:
        self.left_alone.append(LeftAlone(name, type_name, kind, reason))

    @property
    def unconverted(self) -> List[LeftAlone]:
        """Left-alone entries that keep the model from being a complete LCNN (see ``UNCONVERTED_KINDS``)."""
        return [entry for entry in self.left_alone if entry.kind in UNCONVERTED_KINDS]

    @property
    def fully_converted(self) -> bool:
        """True if no entry of an ``UNCONVERTED_KINDS`` kind was left alone (see ``FULLY_CONVERTED_MEANS``).

        Norms, attention, max pooling and gates may remain: they are listed in
        ``left_alone`` but have no LCNN form, so they do not count.
        """
        return not self.unconverted

    @property
    def uncompensated(self) -> List[Compensation]:
        """Function-preserving mode: layers whose output scale changed by ``1 / sigma``."""
        return [c for c in self.compensations if not c.absorbed_by]

    def summary(self) -> str:
        """Counts per (old -> new) and per (kind, type, reason), one line each."""
        lines = [f"replaced {len(self.replaced)} module(s):"]
        for (old, new), count in sorted(Counter((r.old, r.new) for r in self.replaced).items()):
            lines.append(f"  {count:4d} x {old} -> {new}")
        lines.append(f"left alone {len(self.left_alone)}:")
        groups = Counter((e.kind, e.type_name, e.reason) for e in self.left_alone)
        for (kind, type_name, reason), count in sorted(groups.items()):
            lines.append(f"  {count:4d} x [{kind}] {type_name}: {reason}")
        if self.compensations:
            absorbed = len(self.compensations) - len(self.uncompensated)
            lines.append(
                f"function-preserving: {absorbed}/{len(self.compensations)} spectral-norm scales absorbed by BatchNorm"
            )
        if self.preservation is not None:
            lines.append(str(self.preservation))
        if self.fully_converted:
            others = _counts(e for e in self.left_alone if e.kind != "note")
            tail = f" ({others} left alone as listed: not counted)" if others else ""
            lines.append(f"fully converted: {FULLY_CONVERTED_MEANS}{tail}")
        else:
            lines.append(f"NOT fully converted: {_counts(self.unconverted)} left "
                         f"(fully converted means {FULLY_CONVERTED_MEANS})")
        return "\n".join(lines)

    def __str__(self) -> str:
        details = [self.summary(), "details of what was left alone:"]
        details += [f"  {e.name} ({e.type_name}) [{e.kind}]: {e.reason}" for e in self.left_alone]
        details += [f"  {c.name}: output scaled by 1/{c.sigma:.4g} (no BatchNorm absorbs it)" for c in self.uncompensated]
        return "\n".join(details)
