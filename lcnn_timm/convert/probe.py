"""One dummy forward that records what the conversion needs to know about the data flow."""
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .catalog import FUSED_BATCHNORM_ACTS, LINEARS, PLAIN_BATCHNORMS, PLAIN_CONVS, STANDARDIZED_CONVS

__all__ = ["ProbeResult", "probe", "run_once"]

_PRODUCERS = PLAIN_CONVS + STANDARDIZED_CONVS + LINEARS
_NORMS = PLAIN_BATCHNORMS + FUSED_BATCHNORM_ACTS


@dataclass
class ProbeResult:
    """Shapes of every module's first input, per call, and which conv/linear feeds which BatchNorm.

    ``feeds_batchnorm[layer] = bn`` when ``bn`` was the only module that consumed
    ``layer``'s output (so rescaling ``bn`` compensates a rescaled ``layer``).
    Consumers that are not modules (``x + y``, ``torch.cat``) are invisible here;
    in timm's conv -> BN pairs there are none.
    """

    input_shapes: Dict[nn.Module, List[Tuple[int, ...]]] = field(default_factory=lambda: defaultdict(list))
    feeds_batchnorm: Dict[nn.Module, nn.Module] = field(default_factory=dict)

    def spatial_sizes(self, module: nn.Module) -> List[Tuple[int, int]]:
        """Distinct (H, W) of a conv's inputs, in call order."""
        sizes = [tuple(shape[-2:]) for shape in self.input_shapes.get(module, [])]
        return list(dict.fromkeys(sizes))


@torch.no_grad()
def run_once(model: nn.Module, input_size: Sequence[int], batch: int = 1,
             generator: Optional[torch.Generator] = None, call: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None
             ) -> Any:
    """``call(model, x)`` (default ``model(x)``) in eval mode on a random ``(batch, *input_size)`` normal input ``x``,
    drawn with the CPU ``generator`` when given (so that two models can see the same input); every module's
    training flag is restored."""
    training = {m: m.training for m in model.modules()}
    reference = next(iter(model.parameters()), torch.empty(0))
    device = "cpu" if generator is not None else reference.device
    x = torch.randn(batch, *input_size, generator=generator, dtype=reference.dtype, device=device)
    try:
        model.eval()
        return (call or nn.Module.__call__)(model, x.to(reference.device))
    finally:
        for module, mode in training.items():
            module.training = mode


@torch.no_grad()
def probe(model: nn.Module, input_size: Sequence[int]) -> ProbeResult:
    """Run ``model`` once in eval mode on a random ``(1, *input_size)`` input with recording hooks."""
    result = ProbeResult()
    produced: Dict[int, Tuple[nn.Module, torch.Tensor]] = {}  # keeps the tensors alive so ids stay unique
    consumers: Dict[int, List[nn.Module]] = defaultdict(list)

    def record_input(module, args):
        if args and isinstance(args[0], torch.Tensor):
            result.input_shapes[module].append(tuple(args[0].shape))
            if id(args[0]) in produced and (not any(module.children()) or type(module) in _NORMS):
                consumers[id(args[0])].append(module)

    def record_output(module, args, output):
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (module, output)

    handles = [m.register_forward_pre_hook(record_input) for m in model.modules()]
    handles += [m.register_forward_hook(record_output) for m in model.modules() if type(m) in _PRODUCERS]
    try:
        run_once(model, input_size)
    finally:
        for handle in handles:
            handle.remove()
    for key, users in consumers.items():
        layer = produced[key][0]
        called_once = len(result.input_shapes[layer]) == 1
        if called_once and len(users) == 1 and type(users[0]) in _NORMS:
            result.feeds_batchnorm[layer] = users[0]
    return result
