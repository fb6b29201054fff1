"""Certified *upper* bounds on the operator norm of linear and convolutional layers.

Power iteration (what spectral normalisation runs) converges to the largest
singular value from below, so it cannot certify anything. Here:

* :func:`gram_norm_bound`: Gram iteration (Delattre et al., ICML 2023). With
  ``G_0 = A`` and ``G_{t+1} = G_t^H G_t``, ``||A||_2 <= ||G_t||_F^(1 / 2^t)`` for
  every ``t``, and the bound tends to ``||A||_2`` as ``t`` grows. Each step is
  rescaled by its Frobenius norm (tracked in log space) so nothing overflows.
* :func:`conv_norm_bound`: a zero-padded, strided, dilated, grouped conv on an
  ``H x W`` input is ``crop o C o embed`` with ``C`` a circular strided conv on a
  periodic grid of period ``s * N >= padded extent`` (so no wrap-around reaches a
  kept output) and ``embed``/``crop`` of norm 1. ``C`` is block-diagonalised by
  the polyphase DFT: its singular values are those of the per-frequency symbol
  matrices ``K(w)`` (``c_out/g x (c_in/g) s_h s_w``, one per group and frequency
  of the ``N_h x N_w`` grid), so ``||conv|| <= max_w ||K(w)||_2``, each bounded by
  Gram iteration. Proof in docs/certificates.md.

Everything runs in float64; the result is multiplied by ``1 + ROUNDING_MARGIN``
to cover float64 rounding in the FFT and the matrix products (relative ~1e-13).
"""
import math
from typing import Tuple

import torch
from torch import nn

from ..layers.spectral_norm import ConvOperator, LinearOperator, _norm_and_input, is_spectral_normalized

__all__ = ["DEFAULT_GRAM_ITERATIONS", "ROUNDING_MARGIN", "conv_norm_bound", "gram_norm_bound", "layer_norm_bound"]

DEFAULT_GRAM_ITERATIONS = 12  # over-estimate <= rank^(1 / 2^13) - 1 (< 0.09% for rank 1000)
ROUNDING_MARGIN = 1e-9


def gram_norm_bound(matrices: torch.Tensor, iterations: int = DEFAULT_GRAM_ITERATIONS) -> torch.Tensor:
    """Upper bounds on the spectral norms of a batch ``(..., m, n)`` of (complex) matrices, float64, shape ``(...)``."""
    if iterations < 0:
        raise ValueError(f"Gram iteration needs iterations >= 0, got {iterations}")
    g = matrices.to(torch.complex128 if matrices.is_complex() else torch.float64)
    if g.shape[-2] < g.shape[-1]:  # same singular values, smaller Gram matrices
        g = g.mT.conj()
    log_scale = torch.zeros(g.shape[:-2], dtype=torch.float64, device=g.device)
    for _ in range(iterations):
        norm = torch.linalg.matrix_norm(g).clamp_min(torch.finfo(torch.float64).tiny)
        g = g / norm[..., None, None]
        log_scale = 2.0 * (log_scale + norm.log())
        g = g.mT.conj() @ g
    log_bound = (log_scale + torch.linalg.matrix_norm(g).log()) / 2.0**iterations
    return log_bound.exp() * (1.0 + ROUNDING_MARGIN)


def _polyphase_symbols(weight: torch.Tensor, op: ConvOperator) -> torch.Tensor:
    """Symbol matrices ``(groups, N_h, N_w // 2 + 1, c_out/g, (c_in/g) s_h s_w)`` of the circular conv around ``op``."""
    left, right, top, bottom = op.padding
    padded = (op.input_size[0] + top + bottom, op.input_size[1] + left + right)
    grid = tuple(math.ceil(padded[i] / op.stride[i]) for i in range(2))
    c_out, c_in_g, k_h, k_w = weight.shape
    s_h, s_w = op.stride
    # kernel tap p sits at offset p*d = a*s + phase: input channel (c, phase), circular shift a
    taps_h, taps_w = torch.arange(k_h) * op.dilation[0], torch.arange(k_w) * op.dilation[1]
    poly = torch.zeros(c_out, c_in_g, s_h, s_w, *grid, dtype=torch.float64, device=weight.device)
    for p in range(k_h):
        for q in range(k_w):
            ph, ah = int(taps_h[p]) % s_h, (int(taps_h[p]) // s_h) % grid[0]
            pw, aw = int(taps_w[q]) % s_w, (int(taps_w[q]) // s_w) % grid[1]
            poly[:, :, ph, pw, ah, aw] += weight[:, :, p, q].double()
    # the kernel is real, so the symbol at -w is the conjugate of the one at w (same norm): half the grid suffices
    symbols = torch.fft.rfft2(poly)  # (c_out, c_in/g, s_h, s_w, N_h, N_w // 2 + 1)
    symbols = symbols.reshape(op.groups, c_out // op.groups, c_in_g * s_h * s_w, *symbols.shape[-2:])
    return symbols.permute(0, 3, 4, 1, 2)


def conv_norm_bound(weight: torch.Tensor, op: ConvOperator, iterations: int = DEFAULT_GRAM_ITERATIONS) -> torch.Tensor:
    """Certified upper bound on the operator norm of ``op``'s zero-padded conv with ``weight`` (float64 scalar)."""
    op.output_shape(weight)  # refuses geometries with an empty output
    return gram_norm_bound(_polyphase_symbols(weight.detach(), op), iterations).max()


def layer_norm_bound(module: nn.Module, iterations: int = DEFAULT_GRAM_ITERATIONS) -> Tuple[torch.Tensor, object]:
    """Certified bound on the operator norm of a spectrally normalised conv/linear's *effective* weight.

    The effective weight is ``W / sigma`` with sigma the power-iteration estimate, whose
    norm can exceed 1 when the iteration has not converged; the bound is of that weight,
    at the input size the layer was normalised for. Returns ``(bound, operator)``.
    """
    if not is_spectral_normalized(module):
        raise ValueError(f"{type(module).__name__} is not spectrally normalised")
    op = _norm_and_input(module)[0].operator
    with torch.no_grad():
        weight = module.weight.detach()
    if isinstance(op, LinearOperator):
        return gram_norm_bound(weight, iterations), op
    return conv_norm_bound(weight, op, iterations), op
