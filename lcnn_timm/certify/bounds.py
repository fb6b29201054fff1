"""Certified global Lipschitz and input-Hessian bounds of an LCNN's logits and logit differences.

For a map ``f`` let ``L(f)`` bound its Lipschitz constant and ``H(f)`` bound
``sup_x ||D^2 f(x)||`` (the norm of the symmetric bilinear map, for vector-valued
``f``: ``sup_{|u|=|v|=1} ||D^2 f(x)[u, v]||``). Composition (chain rule):

    L(g o f) <= L(g) L(f),      H(g o f) <= H(g) L(f)^2 + L(g) H(f)

Leaves: centered softplus ``(1, beta / 4)`` (``0 < s' <= 1``, ``|s''| <= beta / 4``,
elementwise); Softplus MaxMin ``(1, beta / 2)``; eval-mode gamma-BN ``(min(gamma, ||BN||), 0)``; spectrally
normalised conv/linear ``(certified norm of W / sigma, 0)`` (Gram iteration,
:mod:`.operator_norm`); average pooling ``(sqrt(max row sum * max column sum), 0)``
(Schur test, exact for global average pooling); identity/flatten/dropout ``(1, 0)``.
Halves block ``x -> act(b (F(a x) + S(a x)))`` (``a = 1/sqrt 2``, ``b = 1/2`` unless the instance sets its own):
the sum has ``L <= |a| |b| (L_F + L_S)`` and ``H <= a^2 |b| (H_F + H_S)``, then the activation.

For ``z_i - z_j`` with a final linear layer ``W``: ``L_ij <= ||w_i - w_j|| L(phi)``
and ``H_ij <= ||w_i - w_j|| H(phi)``, ``phi`` the features; otherwise ``sqrt 2`` times
the logits' bounds. Proofs: docs/certificates.md. The bounds hold for the
eval-mode function (BatchNorm running statistics) at the input size the spectral
norms were computed for, over all of R^n (no clipping to [0, 1] assumed).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..layers.centered_softplus import CenteredSoftplus
from ..layers.gamma_batchnorm import _GammaBatchNorm, _lipschitz
from ..layers.halves_residual import HalvesResidual
from ..layers.softplus_maxmin import SoftplusMaxMin
from ..layers.spectral_norm import ConvOperator, _norm_and_input, is_spectral_normalized
from .executed import audit_execution, differential_check
from .operator_norm import DEFAULT_GRAM_ITERATIONS, ROUNDING_MARGIN, layer_norm_bound
from .structure import AVERAGE_POOLS, UNIT_LEAVES, Rules, check_structure, compose, flatten_chain

__all__ = ["Certificate", "MapBound", "certify", "check_eval_mode", "model_input_shape"]


@dataclass(frozen=True)
class MapBound:
    """``lipschitz`` >= Lipschitz constant and ``hessian`` >= sup_x ||D^2 f(x)|| of a map (float64 scalars)."""

    lipschitz: torch.Tensor
    hessian: torch.Tensor


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


@dataclass
class Certificate:
    """Certified bounds of a model's logit differences.

    ``lipschitz[i, j]`` and ``hessian[i, j]`` bound ``z_i - z_j`` over all inputs
    (diagonal 0); ``logits`` bounds the logit map; ``layers`` lists each leaf's
    ``(name, MapBound)`` in forward order.
    """

    lipschitz: torch.Tensor
    hessian: torch.Tensor
    logits: MapBound
    input_shape: Tuple[int, ...]
    layers: List[Tuple[str, MapBound]] = field(default_factory=list, repr=False)
    logit_offsets: Optional[torch.Tensor] = None

    def scaled_input(self, scale: float) -> "Certificate":
        """The certificate of ``x -> model(a * x)`` with ``|a| <= scale`` per coordinate (e.g. 1 / std)."""
        return Certificate(self.lipschitz * scale, self.hessian * scale**2,
                           MapBound(self.logits.lipschitz * scale, self.logits.hessian * scale**2),
                           self.input_shape, self.layers, self.logit_offsets)


def _then(first: MapBound, second: MapBound) -> MapBound:
    return MapBound(first.lipschitz * second.lipschitz,
                    second.hessian * first.lipschitz**2 + second.lipschitz * first.hessian)


def gamma_bn_lipschitz(bn: _GammaBatchNorm) -> torch.Tensor:
    """Exact eval-mode Lipschitz constant of a gamma-BN, ``min(gamma, max_c |w_c| / sqrt(var_c + eps))``, float64.

    ``gamma = exp(log_gamma)`` is taken in float64: ``bn.gamma`` of a float32 layer is rounded to float32, up to
    6e-8 (relative) below the cap the float64 function (``model.double()``, what radii are computed on) applies.
    """
    weight = None if bn.weight is None else bn.weight.detach().double()
    gamma = bn.log_gamma.detach().double().exp()
    return torch.minimum(gamma, _lipschitz(bn.running_var.detach().double(), weight, bn.eps))


def average_pool_lipschitz(pool: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Schur bound ``sqrt(max row sum * max column sum)`` of a non-negative linear pooling at ``input_shape``."""
    ones = torch.ones(1, *input_shape, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = pool(ones)  # A @ 1: the row sums
        (columns,) = torch.autograd.grad(out.sum(), ones)  # A^T @ 1: the column sums
    return (out.detach().max() * columns.max()).sqrt()


class _CertifiedRules(Rules[MapBound]):
    identity = MapBound(_scalar(1.0), _scalar(0.0))

    def __init__(self, input_shapes: Dict[int, Set[Tuple[int, ...]]], iterations: int):
        self.input_shapes = input_shapes
        self.iterations = iterations
        self.layers: List[Tuple[str, MapBound]] = []

    def _input_shape(self, module: nn.Module, name: str) -> Tuple[int, ...]:
        if id(module) not in self.input_shapes:
            raise ValueError(f"{name} ({type(module).__name__}) is not called in the model's forward pass")
        shapes = self.input_shapes[id(module)]
        if len(shapes) > 1:  # one module called at several sizes: its bound would depend on the call
            raise ValueError(f"{name} ({type(module).__name__}) is called on inputs of several shapes "
                             f"{sorted(shapes)}; certify needs one shape per module")
        return next(iter(shapes))

    def _value(self, module: nn.Module, name: str) -> MapBound:
        if isinstance(module, (CenteredSoftplus, SoftplusMaxMin)):
            return MapBound(_scalar(1.0), module.hessian_bound())
        if isinstance(module, _GammaBatchNorm):
            return MapBound(gamma_bn_lipschitz(module), _scalar(0.0))
        if is_spectral_normalized(module):
            bound, op = layer_norm_bound(module, self.iterations)
            seen = self._input_shape(module, name)[1:]
            if isinstance(op, ConvOperator) and tuple(seen) != op.input_size:
                raise ValueError(
                    f"{name} was spectrally normalised for input size {op.input_size} but sees {tuple(seen)}: "
                    "certify the model at the input size it was built for"
                )
            return MapBound(bound, _scalar(0.0))
        if isinstance(module, AVERAGE_POOLS):
            return MapBound(average_pool_lipschitz(module, self._input_shape(module, name)), _scalar(0.0))
        return self.identity  # identity, flatten, eval-mode dropout

    def leaf(self, module: nn.Module, name: str) -> MapBound:
        value = self._value(module, name)
        self.layers.append((name, value))
        return value

    def then(self, first: MapBound, second: MapBound) -> MapBound:
        return _then(first, second)

    def halves(self, residual: MapBound, shortcut: MapBound, block: HalvesResidual) -> MapBound:
        # the instance's own scales (class defaults 1/sqrt 2 and 1/2 give (L_F + L_S) / (2 sqrt 2), (H_F + H_S) / 4)
        a, b = abs(float(block.input_scale)), abs(float(block.output_scale))
        return MapBound((residual.lipschitz + shortcut.lipschitz) * (a * b),
                        (residual.hessian + shortcut.hessian) * (a * a * b))


def check_eval_mode(model: nn.Module) -> None:
    """Refuse a model any of whose modules is in training mode (a BatchNorm or Dropout inside an eval model
    included): the bounds are for the eval-mode function, and a training-mode forward updates statistics."""
    training = next((name or type(model).__name__ for name, m in model.named_modules() if m.training), None)
    if training is not None:
        raise ValueError(f"{training} is in training mode: call model.eval() first (the certificate is for the "
                         "eval-mode function, with BatchNorm running statistics)")


def model_input_shape(model: nn.Module) -> Tuple[int, ...]:
    """Input shape (without batch) the first spectrally normalised layer was built for."""
    for module in model.modules():
        if is_spectral_normalized(module):
            return _norm_and_input(module)[0].operator.input_shape[1:]
    raise ValueError(f"{type(model).__name__} has no spectrally normalised layer to read its input size from; "
                     "pass input_shape")


def _record_shapes(model: nn.Module, input_shape: Tuple[int, ...]) -> Tuple[Dict[int, Set[Tuple[int, ...]]], int]:
    """Every module's input shapes (by ``id``, without batch; a module called twice may see two) in one forward
    pass, and the number of outputs."""
    shapes: Dict[int, Set[Tuple[int, ...]]] = {}

    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor):  # parametrizations are called without arguments
            shapes.setdefault(id(module), set()).add(tuple(args[0].shape[1:]))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        parameter = next(model.parameters(), None)
        kwargs = dict(dtype=parameter.dtype, device=parameter.device) if parameter is not None else {}
        with torch.no_grad():
            outputs = model(torch.zeros(1, *input_shape, **kwargs)).shape[-1]
    finally:
        for handle in handles:
            handle.remove()
    return shapes, outputs


@torch.no_grad()
def certify(model: nn.Module, input_shape: Optional[Sequence[int]] = None,
            iterations: int = DEFAULT_GRAM_ITERATIONS) -> Certificate:
    """Certified Lipschitz and Hessian bounds of every logit difference of an eval-mode LCNN.

    Args:
        model: an LCNN in eval mode (chains of the covered layers and halves blocks).
        input_shape: input shape without batch; default: the size the spectral norms were built for.
        iterations: Gram iterations per operator-norm bound.

    Raises:
        UnsupportedStructureError: naming the first module outside the theory, or whose execution differs from the
            function certified (hooks, subclasses, replaced forwards, changed geometry; :mod:`.executed`).
    """
    check_eval_mode(model)
    name = type(model).__name__
    check_structure(model, name)  # before anything runs
    audit_execution(model, name)
    layers = flatten_chain(model, name)
    shape = tuple(input_shape) if input_shape is not None else model_input_shape(model)
    differential_check(model, shape, name)
    shapes, outputs = _record_shapes(model, shape)
    rules = _CertifiedRules(shapes, iterations)
    head_name, head = layers[-1]
    body = layers[:-1] if isinstance(head, nn.Linear) else layers
    last = _last_activation(body) if isinstance(head, nn.Linear) else None
    before = body if last is None else body[:last]
    inner = rules.identity  # the map up to the last activation (all of phi without one)
    for layer_name, layer in before:
        inner = _then(inner, compose(layer, layer_name, rules))
    phi = inner
    for layer_name, layer in body[len(before):]:  # the last activation and the reshapes after it
        phi = _then(phi, compose(layer, layer_name, rules))
    if not isinstance(head, nn.Linear):
        rows = math.sqrt(2.0) * (1.0 - torch.eye(outputs, dtype=torch.float64))  # ||e_i - e_j|| = sqrt 2
        return Certificate(rows * phi.lipschitz, rows * phi.hessian, phi, shape, rules.layers, None)
    logits = _then(phi, compose(head, head_name, rules))
    weight = head.weight.detach().double()
    # ||w_i - w_j||, raised past the rounding of the distance itself
    rows = torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist") * (1.0 + ROUNDING_MARGIN)
    offsets = head.bias.detach().double().abs() if head.bias is not None else None
    if last is None:
        hessian = rows * phi.hessian
    else:
        # (w_i - w_j)^T s(g(x)): the activation's second derivative meets w_i - w_j coordinate by coordinate, so its
        # term is bounded by a max-norm of w_i - w_j instead of the 2-norm (docs/certificates.md, section 3)
        act_name, act = body[last]
        curvature = _head_activation_curvature(act, weight, rules._input_shape(act, act_name))
        hessian = rows * inner.hessian + curvature * (1.0 + ROUNDING_MARGIN) * inner.lipschitz**2
    return Certificate(rows * phi.lipschitz, hessian, logits, shape, rules.layers, offsets)


def _last_activation(body: List[Tuple[str, nn.Module]]) -> Optional[int]:
    """Index of a final activation leaf followed only by reshapes (flatten, identity, dropout), else None."""
    index = len(body)
    while index > 0 and isinstance(body[index - 1][1], UNIT_LEAVES):
        index -= 1
    if index > 0 and isinstance(body[index - 1][1], (CenteredSoftplus, SoftplusMaxMin)):
        return index - 1
    return None


def _head_activation_curvature(act: nn.Module, weight: torch.Tensor, input_shape: Tuple[int, ...]) -> torch.Tensor:
    """``kappa[i, j] >= sup |(w_i - w_j)^T D^2 act(h)[a, b]|`` over ``|a| = |b| = 1`` (float64, classes x classes).

    Centered softplus: ``sum_k c_k s''(h_k) a_k b_k``, so ``max_k |c_k| beta / 4``. Softplus MaxMin: only each pair's
    ``q`` coordinate is curved, with weight ``(c_a - c_b) / sqrt 2`` (``c = w_i - w_j`` in the activation's output
    layout, channel c paired with c + C/2), so ``max |c_a - c_b| / sqrt 2 * beta / 2``.
    """
    rows = []
    for row in weight:  # one class at a time: classes x classes x features would not fit for wide heads
        difference = row - weight
        if isinstance(act, SoftplusMaxMin):
            difference = difference.reshape(len(weight), input_shape[0], -1)
            half = input_shape[0] // 2
            rows.append((difference[:, :half] - difference[:, half:]).abs().flatten(1).amax(1) * math.sqrt(0.5))
        else:
            rows.append(difference.abs().amax(1))
    return torch.stack(rows) * act.hessian_bound()
