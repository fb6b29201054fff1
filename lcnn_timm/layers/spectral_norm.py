"""Spectral normalisation by the norm of the *true* linear operator of a layer.

``torch.nn.utils.spectral_norm`` normalises a convolution by the largest singular
value of its kernel reshaped to a matrix, which under-estimates the operator's
norm. Here the power iteration runs on the operator itself: ``conv2d`` for the
map and ``conv_transpose2d`` for its adjoint, on a feature map of the layer's
real input size, with the layer's stride, padding (including timm's dynamic
"same" padding), dilation and groups.

The normalisation is a ``torch.nn.utils.parametrize`` parametrization of
``weight``, so it works on any module that feeds ``self.weight`` to
``F.conv2d``/``F.linear`` and survives ``copy.deepcopy`` and ``torch.fx`` tracing
(parametrized torch convs stay fx leaves). Two conventions keep such a layer a
timm layer:

- ``state_dict`` stores the raw parameter ``V`` under ``<layer>.weight`` (where
  timm and its checkpoint tools look for it) instead of torch's
  ``<layer>.parametrizations.weight.original``; both names load. The layer
  computes ``V / sigma(V)``, so a plain (un-normalised) layer must not load it:
  use :func:`remove_spectral_norms` / ``lcnn_timm.freeze`` for plain weights.
- ``torch.jit.script`` (parametrizations are not scriptable) compiles a copy of
  the layer with ``V / sigma`` baked, through ``__prepare_scriptable__``. Note
  that torch puts the prepared copy into the *parent* module in place, so a
  scripted ``torch.fx.GraphModule``'s layers are baked afterwards; the
  ``lcnn_*`` models script a deep copy of themselves and are left unchanged.

At registration (and in
:func:`refresh_spectral_norms`) the singular vectors are converged by Lanczos
iteration on ``A^T A``, which reaches 1e-6 relative accuracy in tens of steps
where power iteration can stall at a few percent (close singular values). In
training mode each forward then runs ``n_power_iterations`` warm-started power
steps; in eval mode none are run and sigma is the Rayleigh quotient of the
stored singular vectors for the current weight (one operator application).

The norm is that of the operator at the layer's input size: the same kernel on
a larger input has a larger norm (up to the supremum of its symbol over all
frequencies). Training at another size is refused and evaluating at another
size warns, both naming the layer and the fix.
"""
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "ConvOperator",
    "LinearOperator",
    "OperatorSpectralNorm",
    "canonical_weight_keys",
    "spectral_norm",
    "is_spectral_normalized",
    "lanczos_top_singular_value",
    "normalized_layer_norms",
    "operator_norm",
    "refresh_spectral_norms",
    "remove_spectral_norms",
    "scriptable_copy",
]


@dataclass(frozen=True)
class ConvOperator:
    """Geometry of a 2d convolution seen as a linear map ``R^(C_in x H x W) -> R^(C_out x H' x W')``.

    ``padding`` is explicit and possibly asymmetric: (left, right, top, bottom).
    """

    in_channels: int
    input_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]
    dilation: Tuple[int, int]
    groups: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return (1, self.in_channels, *self.input_size)

    def output_shape(self, weight: torch.Tensor) -> Tuple[int, ...]:
        left, right, top, bottom = self.padding
        padded = (self.input_size[0] + top + bottom, self.input_size[1] + left + right)
        out = [
            (padded[i] - self.dilation[i] * (weight.shape[2 + i] - 1) - 1) // self.stride[i] + 1 for i in range(2)
        ]
        if min(out) < 1:
            raise ValueError(
                f"convolution with kernel {tuple(weight.shape[2:])} gives an empty output on input size {self.input_size}"
            )
        return (1, weight.shape[0], *out)

    def apply(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(v, self.padding), weight, None, self.stride, 0, self.dilation, self.groups)

    def adjoint(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.padding
        padded = (self.input_size[0] + top + bottom, self.input_size[1] + left + right)
        # output_padding restores the rows/cols that the strided forward map never reads
        output_padding = tuple(
            padded[i] - ((u.shape[2 + i] - 1) * self.stride[i] + self.dilation[i] * (weight.shape[2 + i] - 1) + 1)
            for i in range(2)
        )
        full = F.conv_transpose2d(u, weight, None, self.stride, 0, output_padding, self.groups, self.dilation)
        return full[:, :, top : top + self.input_size[0], left : left + self.input_size[1]]


@dataclass(frozen=True)
class LinearOperator:
    """A dense ``y = W x`` map (bias excluded: it does not change the Lipschitz constant)."""

    in_features: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return (1, self.in_features)

    def output_shape(self, weight: torch.Tensor) -> Tuple[int, ...]:
        return (1, weight.shape[0])

    def apply(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(v, weight)

    def adjoint(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return u @ weight


Operator = Union[ConvOperator, LinearOperator]


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv_padding(conv: nn.Conv2d, input_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) zero padding that ``conv`` applies to an input of ``input_size``."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    kernel, stride, dilation = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
    if isinstance(conv, Conv2dSame):  # timm's TF-style "same": computed from the input size at every call
        pad_h, pad_w = (get_same_padding(input_size[i], kernel[i], stride[i], dilation[i]) for i in range(2))
        return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # torch's "same" (stride 1): extra padding goes right/bottom
        total_h, total_w = (dilation[i] * (kernel[i] - 1) for i in range(2))
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    pad_h, pad_w = _pair(conv.padding)
    return (pad_w, pad_w, pad_h, pad_h)


def _refuse_standardized(module: nn.Module) -> None:
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    if isinstance(module, (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)):
        raise ValueError(
            f"{type(module).__name__} standardises its weight inside forward, which undoes any normalisation of "
            "`weight` (its operator norm would stay unchanged): convert the model with lcnn_timm.convert_model, "
            "which moves the standardisation into the parametrization before the spectral norm"
        )


def operator_for(module: nn.Module, input_size: Optional[Sequence[int]] = None) -> Operator:
    """The linear operator of a conv2d (needs the spatial ``input_size``) or linear layer."""
    if isinstance(module, nn.Linear):
        return LinearOperator(module.in_features)
    if isinstance(module, nn.Conv2d):
        _refuse_standardized(module)
        if module.padding_mode != "zeros":
            raise ValueError(
                f"{type(module).__name__} uses padding_mode={module.padding_mode!r}; only zero padding has a "
                "conv_transpose2d adjoint"
            )
        if input_size is None or len(input_size) != 2:
            raise ValueError(
                f"spectral norm of {type(module).__name__} needs its spatial input_size (H, W), got {input_size!r}"
            )
        size = (int(input_size[0]), int(input_size[1]))
        return ConvOperator(
            module.in_channels,
            size,
            _pair(module.stride),
            _conv_padding(module, size),
            _pair(module.dilation),
            module.groups,
        )
    raise TypeError(f"no operator spectral norm for {type(module).__name__}: expected nn.Conv2d or nn.Linear")


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.norm().clamp_min(eps)


def lanczos_top_singular_value(
    apply: Callable[[torch.Tensor], torch.Tensor],
    adjoint: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    max_steps: int = 100,
    tol: Optional[float] = None,
) -> Tuple[float, torch.Tensor]:
    """Largest singular value of ``A`` and its right singular vector, by Lanczos on ``A^T A`` from ``start``.

    Full re-orthogonalisation keeps the Krylov basis exact (at most ``max_steps``
    vectors are stored); iteration stops when the top Ritz value of ``A^T A``
    changes by less than ``tol`` (relative; default 1e-7 in float64, 2e-6 in
    lower precision) over two steps, or the Krylov space is exhausted. The Ritz
    value never exceeds ``sigma_max^2``: the result is a lower estimate, accurate
    to about ``tol / 2`` once converged.
    """
    if tol is None:
        tol = 1e-7 if start.dtype == torch.float64 else 2e-6
    shape = start.shape
    max_steps = min(max_steps, start.numel())  # the Krylov space cannot grow past the dimension
    # grown by doubling: converging takes tens of steps, and max_steps rows of a large map would be gigabytes
    basis = start.new_zeros(min(max_steps, 16) + 1, start.numel())
    basis[0] = _normalize(start.reshape(-1), 1e-30)
    alphas: List[float] = []
    betas: List[float] = []
    history: List[float] = []
    top_vector = torch.ones(1, dtype=torch.float64)
    for step in range(max_steps):
        w = adjoint(apply(basis[step].view(shape))).reshape(-1)
        alphas.append(float(w @ basis[step]))
        kept = basis[: step + 1]
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - (kept @ w) @ kept
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        history.append(float(values[-1]))
        top_vector = vectors[:, -1]
        beta = float(w.norm())
        invariant = beta <= 1e-10 * max(abs(history[-1]), 1e-300)  # the Ritz value is exact
        if invariant or (len(history) > 2 and history[-1] - history[-3] <= tol * abs(history[-1])):
            break
        betas.append(beta)
        if step + 1 == basis.shape[0]:
            basis = torch.cat([basis, torch.zeros_like(basis)])
        basis[step + 1] = w / beta
    vector = top_vector.to(start.dtype) @ basis[: top_vector.numel()]
    return math.sqrt(max(history[-1], 0.0)), _normalize(vector, 1e-30).view(shape)


class OperatorSpectralNorm(nn.Module):
    """Parametrization ``weight -> weight / sigma(weight)`` with sigma the operator's spectral norm.

    Args:
        weight: the weight to be parametrized (sets the buffers' dtype and device).
        operator: the layer's operator geometry.
        n_power_iterations: power-iteration steps per training-mode forward.
        init_iterations: at most this many Lanczos steps, run once at registration (0: skip).
        eps: guards the normalisation of the singular vectors.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        operator: Operator,
        n_power_iterations: int = 1,
        init_iterations: int = 100,
        eps: float = 1e-12,
    ):
        super().__init__()
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.operator = operator
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        # what the TorchScript-compiled sigma needs, as scriptable attributes
        self.is_conv = isinstance(operator, ConvOperator)
        conv = operator if isinstance(operator, ConvOperator) else ConvOperator(1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1)
        self.padding: List[int] = list(conv.padding)
        self.stride: List[int] = list(conv.stride)
        self.dilation: List[int] = list(conv.dilation)
        self.groups: int = conv.groups
        w = weight.detach()
        kwargs = dict(device=w.device, dtype=w.dtype)
        self.register_buffer("_v", _normalize(torch.randn(operator.input_shape, **kwargs), eps))
        self.register_buffer("_u", _normalize(torch.randn(operator.output_shape(w), **kwargs), eps))
        if init_iterations > 0:
            self.converge(w, init_iterations)

    @torch.jit.unused
    def lanczos(self, weight: torch.Tensor, max_steps: int = 100, tol: Optional[float] = None) -> Tuple[float, torch.Tensor]:
        """Operator norm of ``weight`` and its top right singular vector, by Lanczos iteration started at the
        stored right singular vector (a few steps when that has converged). The buffers are left unchanged."""
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            weight = weight.detach().to(self._v.dtype)
            return lanczos_top_singular_value(
                lambda x: self.operator.apply(x, weight), lambda y: self.operator.adjoint(y, weight), self._v,
                max_steps, tol,
            )

    @torch.jit.unused
    def converge(self, weight: torch.Tensor, max_steps: int = 100, tol: Optional[float] = None) -> float:
        """Converge the stored singular vectors by Lanczos iteration; returns the operator norm found."""
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            weight = weight.detach().to(self._v.dtype)
            sigma, v = self.lanczos(weight, max_steps, tol)
            self._v.copy_(v)
            self._u.copy_(_normalize(self.operator.apply(self._v, weight), self.eps))
        return sigma

    @torch.jit.unused
    def power_iteration(self, weight: torch.Tensor, iterations: int) -> None:
        """Run ``iterations`` power-iteration steps in place on the stored singular vectors."""
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            weight = weight.detach().to(self._v.dtype)
            for _ in range(iterations):
                self._v.copy_(_normalize(self.operator.adjoint(self._u, weight), self.eps))
                self._u.copy_(_normalize(self.operator.apply(self._v, weight), self.eps))

    def _rayleigh(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.to(self._v.dtype)
        if self.is_conv:
            out = F.conv2d(F.pad(self._v, self.padding), weight, None, self.stride, 0, self.dilation, self.groups)
        else:
            out = F.linear(self._v, weight)
        return torch.sum(self._u * out)

    @torch.jit.unused
    def _full_precision_rayleigh(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            return self._rayleigh(weight)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """Rayleigh estimate ``<u, A v>`` of the operator norm, in the buffers' precision; differentiable in ``weight``."""
        if torch.jit.is_scripting():
            return self._rayleigh(weight)
        return self._full_precision_rayleigh(weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and not torch.jit.is_scripting():
            self.power_iteration(weight, self.n_power_iterations)
        sigma = self.sigma(weight)
        return weight / sigma.clamp_min(self.eps).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.operator}, n_power_iterations={self.n_power_iterations}"


def _check_input(module: nn.Module, args: Tuple[torch.Tensor]) -> None:
    """Forward pre-hook: refuse (training) or warn about (eval) inputs of another size than the norm's.

    Typed and returning early under TorchScript, which compiles pre-hooks; scripted models skip the check.
    """
    if torch.jit.is_scripting():
        return
    _check_input_eager(module, args[0])


def _check_input_eager(module: nn.Module, x: torch.Tensor) -> None:
    operator = _norm_and_input(module)[0].operator
    if isinstance(operator, ConvOperator):
        if x.dim() != 4 or x.shape[1] != operator.in_channels:
            raise ValueError(
                f"{type(module).__name__} expects (N, {operator.in_channels}, H, W) input, got shape {tuple(x.shape)}"
            )
        size = tuple(x.shape[-2:])
        if size != operator.input_size:
            layer = f"{type(module).__name__}({module.in_channels}, {module.out_channels}, kernel_size={module.kernel_size}, stride={module.stride})"
            fix = (
                "Rebuild the model for the new size: timm.create_model(..., img_size=H) for the lcnn_* models, "
                "lcnn_timm.convert_model(model, input_size=(C, H, W)) again for a converted model, or "
                "lcnn_timm.layers.spectral_norm(layer, input_size=(H, W), replace=True) for one layer."
            )
            if module.training:
                raise ValueError(
                    f"{layer} was spectrally normalised for input size {operator.input_size} but got {size} in "
                    f"training mode. {fix}"
                )
            if getattr(module, "_warned_input_size", None) != size:
                module._warned_input_size = size
                warnings.warn(
                    f"{layer} was spectrally normalised for input size {operator.input_size} but is evaluated at "
                    f"{size}: its operator norm there can exceed 1 (it grows with the input size), so Lipschitz "
                    f"figures do not hold at this size. {fix}",
                    stacklevel=2,
                )
    elif x.shape[-1] != operator.in_features:
        raise ValueError(f"{type(module).__name__} expects {operator.in_features} input features, got shape {tuple(x.shape)}")


def _norm_and_input(module: nn.Module) -> Tuple[OperatorSpectralNorm, torch.Tensor]:
    """The module's :class:`OperatorSpectralNorm` and the weight it receives.

    The norm may follow other parametrizations in the chain (e.g. weight
    standardisation), so its input is the original weight passed through them.
    """
    weight = module.parametrizations.weight.original
    for parametrization in module.parametrizations.weight:
        if isinstance(parametrization, OperatorSpectralNorm):
            return parametrization, weight
        weight = parametrization(weight)
    raise ValueError(f"{type(module).__name__} is not spectrally normalised")


def is_spectral_normalized(module: nn.Module) -> bool:
    """True if ``module.weight`` is parametrized by :class:`OperatorSpectralNorm`."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, OperatorSpectralNorm) for p in module.parametrizations.weight
    )


def spectral_norm(
    module: nn.Module,
    input_size: Optional[Sequence[int]] = None,
    n_power_iterations: int = 1,
    init_iterations: int = 100,
    replace: bool = False,
) -> nn.Module:
    """Normalise ``module`` (``nn.Conv2d`` or ``nn.Linear``) by its operator norm, in place.

    Args:
        module: the layer; its forward must read ``self.weight`` (timm's weight-standardised
            convs are refused: :func:`lcnn_timm.convert_model` handles them).
        input_size: spatial (H, W) of the conv's input; unused for linear layers.
        n_power_iterations: power-iteration steps per training forward.
        init_iterations: at most this many Lanczos steps now (stopping once sigma^2 changes by
            < 2e-6, 1e-7 in float64), so the norm is exact to ~1e-6 before training; 0 skips (call
            :func:`refresh_spectral_norms` later).
        replace: re-register (e.g. for a new input size) if already normalised.

    Returns:
        The same module.
    """
    if is_spectral_normalized(module):
        if not replace:
            raise ValueError(f"{type(module).__name__} is already spectrally normalised (pass replace=True)")
        remove_spectral_norms(module)
    operator = operator_for(module, input_size)
    if not bool(module.weight.detach().abs().max() > 0):
        raise ValueError(
            f"{type(module).__name__} has an all-zero weight: its operator norm is 0, so W / sigma(W) is undefined "
            "(and its gradient, 1 / sigma, unbounded). A normalised layer has norm 1 at any scale, so zero "
            "initialisation means nothing for it: initialise the weight first (lcnn_timm.convert_model does)"
        )
    parametrize.register_parametrization(
        module, "weight", OperatorSpectralNorm(module.weight, operator, n_power_iterations, init_iterations)
    )
    module.register_forward_pre_hook(_check_input)
    module.register_state_dict_post_hook(_store_weight_as_weight)
    module.register_load_state_dict_pre_hook(_load_weight_into_original)
    # parametrize gives every parametrized module a class of its own, so this names only this layer
    type(module).__prepare_scriptable__ = _baked_copy
    return module


_ORIGINAL = "parametrizations.weight.original"


def _store_weight_as_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: the raw weight under ``<prefix>weight``, the key timm expects, first as in a plain layer."""
    if is_spectral_normalized(module) and prefix + _ORIGINAL in state_dict:
        # this module's entries are the last ones written: re-append them with the weight first
        own = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        state_dict[prefix + "weight"] = own.pop(prefix + _ORIGINAL)
        state_dict.update(own)


def _load_weight_into_original(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: ``<prefix>weight`` (this format) goes to the parametrization's ``original``."""
    if is_spectral_normalized(module) and prefix + "weight" in state_dict:
        state_dict[prefix + _ORIGINAL] = state_dict.pop(prefix + "weight")


def canonical_weight_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state_dict`` with torch's ``<layer>.parametrizations.weight.original`` named ``<layer>.weight``.

    The key a normalised layer stores its raw weight under since 2026-11-30; for comparing checkpoints of
    either format with a model (both load as they are).
    """
    suffix = "." + _ORIGINAL
    return {k[: -len(suffix)] + ".weight" if k.endswith(suffix) else k: v for k, v in state_dict.items()}


def _baked_copy(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of a normalised layer: a copy with ``V / sigma`` baked."""
    return remove_spectral_norms(copy.deepcopy(module))


def remove_spectral_norms(model: nn.Module) -> nn.Module:
    """Bake ``W / sigma`` into plain weights everywhere (for export / fast inference), in place.

    The whole parametrization chain of ``weight`` is baked (e.g. standardisation, then the norm).
    """
    for module in model.modules():
        if is_spectral_normalized(module):
            # remove_parametrizations deletes the ``weight`` property from the module's class, which a
            # deep copy shares with its original: give this module a class of its own first.
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            _remove_hooks(module._forward_pre_hooks, _check_input)
            _remove_hooks(module._state_dict_hooks, _store_weight_as_weight)
            _remove_hooks(module._load_state_dict_pre_hooks, _load_weight_into_original)
    return model


def _remove_hooks(hooks: dict, function: Callable) -> None:
    # load pre-hooks are stored wrapped (torch's _WrappedHook keeps the function as .hook)
    for key, hook in list(hooks.items()):
        if hook is function or getattr(hook, "hook", None) is function:
            del hooks[key]


def scriptable_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every normalised weight baked, for ``torch.jit.script``.

    ``torch.nn.utils.parametrize`` refuses TorchScript, so models return this from
    ``__prepare_scriptable__``: the scripted model computes exactly what the eval-mode
    model computes now, and does not continue the power iteration.
    """
    return remove_spectral_norms(copy.deepcopy(model))


def refresh_spectral_norms(model: nn.Module, iterations: int = 100) -> int:
    """Converge the singular vectors of every normalised layer (e.g. after re-initialising weights).

    Runs at most ``iterations`` Lanczos steps per layer. Returns the number of layers refreshed.
    """
    count = 0
    for module in model.modules():
        if is_spectral_normalized(module):
            norm, weight = _norm_and_input(module)
            norm.converge(weight, iterations)
            count += 1
    return count


def normalized_layer_norms(model: nn.Module, max_steps: int = 100) -> Dict[str, float]:
    """Operator norm of every spectrally normalised layer's map as evaluated (eval mode), by layer name.

    Eval mode divides the weight by the Rayleigh quotient of the stored singular vectors, so a layer's norm is 1
    only once they have converged; the per-step power iteration of training can leave them lagging (then the
    norm exceeds 1). Each value is ``sigma / stored_sigma``, with ``sigma`` from Lanczos iteration (a lower
    estimate of the true norm, accurate to about 1e-6 once converged). The model is not changed.
    """
    norms = {}
    for name, module in model.named_modules():
        if is_spectral_normalized(module):
            norm, weight = _norm_and_input(module)
            with torch.no_grad():
                stored = norm.sigma(weight).item()
            norms[name] = norm.lanczos(weight, max_steps)[0] / max(stored, norm.eps)
    return norms


def operator_norm(module: nn.Module) -> torch.Tensor:
    """Current estimate of the operator norm of the weight *before* normalisation.

    That is the raw weight, or, when the norm follows other parametrizations
    (weight standardisation), the weight they produce.
    """
    if not is_spectral_normalized(module):
        raise ValueError(f"{type(module).__name__} is not spectrally normalised")
    norm, weight = _norm_and_input(module)
    return norm.sigma(weight).detach()
