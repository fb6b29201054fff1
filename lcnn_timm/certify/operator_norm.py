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
* :func:`dense_conv_norm_bound`: exact to ~1e-7 where the circular embedding is
  loose (small maps: 1.25-1.28x on 4x4). The zero-padded conv is
  ``A = sum_k S_k (x) W_k`` (``S_k`` the 0/1 map of tap ``k`` between positions,
  kept as index lists), so its Gram matrix ``M = sum_{k,l} S_k^T S_l (x) W_k^T W_l``
  is assembled from tap products; ``lambda_max(M) <= mu`` is then *verified* by a Cholesky
  factorisation of ``mu I - M`` running to completion, with the floating-point
  error of the assembly and the factorisation bounded explicitly (Higham,
  Accuracy and Stability, Thm 10.3; docs/certificates.md).

Everything runs in float64; the result is multiplied by ``1 + ROUNDING_MARGIN``
to cover float64 rounding in the FFT and the matrix products (relative ~1e-13).
"""
import dataclasses
import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..layers.spectral_norm import (ConvOperator, LinearOperator, _norm_and_input, is_spectral_normalized,
                                    lanczos_top_singular_value)

__all__ = ["DEFAULT_GRAM_ITERATIONS", "DENSE_LIMIT", "ROUNDING_MARGIN", "conv_norm_bound", "dense_conv_norm_bound",
           "gram_norm_bound", "layer_norm_bound"]

DEFAULT_GRAM_ITERATIONS = 12  # over-estimate <= rank^(1 / 2^13) - 1 (< 0.09% for rank 1000)
ROUNDING_MARGIN = 1e-9
# Gram matrices up to this side (per group; groups x side^2 entries in all: 512 MiB in float64) are verified densely
DENSE_LIMIT = 8192
_UNIT_ROUNDOFF = 2.0**-53


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


def _gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``: the relative error bound of a sum of ``k`` float64 products."""
    return k * _UNIT_ROUNDOFF / (1 - k * _UNIT_ROUNDOFF)


def _tap_sources(op: ConvOperator, kernel_size: Tuple[int, int]) -> torch.Tensor:
    """``(taps, out positions)``: the input position that tap ``k`` of each output position reads, -1 for padding.

    The operator's own padding, stride and dilation applied to an image holding ``position + 1`` with one-hot kernels
    (exact in float64: each output is one input value times 1).
    """
    h, w = op.input_size
    taps = kernel_size[0] * kernel_size[1]
    image = torch.arange(1, h * w + 1, dtype=torch.float64).reshape(1, 1, h, w)
    kernels = torch.eye(taps, dtype=torch.float64).reshape(taps, 1, *kernel_size)
    single = dataclasses.replace(op, in_channels=1, groups=1)
    return single.apply(image, kernels).reshape(taps, -1).round().long() - 1


def _destinations(sources: torch.Tensor, positions: int) -> torch.Tensor:
    """The inverse maps ``(taps, in positions)``: the output position whose tap ``k`` reads each input, -1 if none
    (unique: a tap reads different inputs for different outputs)."""
    destinations = torch.full((sources.shape[0], positions), -1, dtype=torch.long)
    for k, row in enumerate(sources):
        valid = row >= 0
        destinations[k, row[valid]] = valid.nonzero().flatten()
    return destinations


def dense_conv_norm_bound(weight: torch.Tensor, op: ConvOperator, limit: int = DENSE_LIMIT) -> Optional[torch.Tensor]:
    """Certified upper bound on ``op``'s zero-padded conv norm, within ~1e-7 of it (float64 scalar), or None.

    None when the Gram matrix is larger than ``limit`` (per group; ``groups * side^2 <= limit^2`` in all) or the
    verification does not succeed. ``mu`` is a Lanczos estimate of ``||A||^2`` raised by 1e-7 (then 1e-5, 1e-3
    where the factorisation fails); the bound is ``sqrt`` of ``mu`` plus the explicit float64 error bounds.
    """
    weight = weight.detach().double()
    _, _, out_h, out_w = op.output_shape(weight)
    c_out, c_in_g, k_h, k_w = weight.shape
    per_tap = weight.reshape(op.groups, c_out // op.groups, c_in_g, k_h * k_w).permute(0, 3, 1, 2)  # (g, K, o, i)
    in_positions, out_positions = op.input_size[0] * op.input_size[1], out_h * out_w
    # A^T A pairs, per output position, the inputs two taps read; A A^T pairs, per input, the outputs reading it
    transposed = out_positions * per_tap.shape[2] < in_positions * per_tap.shape[3]
    positions = out_positions if transposed else in_positions
    side = positions * (per_tap.shape[2] if transposed else per_tap.shape[3])
    if side > limit or op.groups * side * side > limit * limit:
        return None
    sources = _tap_sources(op, (k_h, k_w))
    index = _destinations(sources, in_positions) if transposed else sources
    if transposed:
        per_tap = per_tap.transpose(2, 3)
    channels = per_tap.shape[3]
    start = torch.randn(op.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    estimate, _ = lanczos_top_singular_value(lambda v: op.apply(v, weight), lambda u: op.adjoint(u, weight), start,
                                             max_steps=200, tol=1e-12)
    # M = sum_{k,l} (S_k^T S_l) (x) (W_k^T W_l), S_k^T S_l a 0/1 matrix with one entry per position both taps reach:
    # each entry of M is a sum of at most K^2 terms, each a sum of c products (c the contracted channels)
    products = torch.einsum("gkoi,gloj->gklij", per_tap, per_tap)
    gram = torch.zeros(op.groups, positions, channels, positions, channels, dtype=torch.float64)
    for k in range(index.shape[0]):
        for l in range(index.shape[0]):
            both = (index[k] >= 0) & (index[l] >= 0)
            gram[:, index[k][both], :, index[l][both], :] += products[:, k, l]  # pairs are distinct: no collisions
    gram = gram.reshape(op.groups, side, side)
    top = _verified_top_eigenvalue(gram, estimate**2)
    if top is None:
        return None
    # |M_computed - M| <= gamma (|A|^T |A|) entrywise, and ||(|A|^T |A|)|| <= ||A||_F^2 = trace(M)
    assembly = _gamma(per_tap.shape[2] + index.shape[0] ** 2) * gram.diagonal(dim1=1, dim2=2).sum(-1).max() * (1 + 1e-6)
    return (top + assembly).sqrt() * (1.0 + ROUNDING_MARGIN)


def _verified_top_eigenvalue(grams: torch.Tensor, estimate: float) -> Optional[torch.Tensor]:
    """``b >= lambda_max`` of every matrix in a batch of symmetric ones with non-negative diagonals, or None.

    If the float64 Cholesky factorisation of ``H = mu I - G`` runs to completion, then ``R^T R = H + E`` with
    ``|E| <= gamma_{n+1} |R^T| |R|`` (Higham Thm 10.3), whence ``lambda_min(H) >= -gamma_{n+1} tr(H) / (1 -
    gamma_{n+1})`` and ``lambda_max(G) <= mu (1 + u + gamma_{n+1} n / (1 - gamma_{n+1}))`` (``u mu`` covers the
    rounding of ``mu - G_ii``, and ``tr(H) <= n mu``). ``mu`` is ``estimate`` raised by 1e-7, then 1e-5, 1e-3.
    """
    n = grams.shape[-1]
    floor = grams.diagonal(dim1=1, dim2=2).max()  # lambda_max >= every diagonal entry
    estimate = max(estimate, floor.item())
    if estimate == 0:
        return floor
    # a power of two: exact scaling, entries near 1 (no underflow or overflow in the factorisation)
    scale = 2.0 ** -math.frexp(estimate)[1]
    slack = 1 + _UNIT_ROUNDOFF + _gamma(n + 1) * n / (1 - _gamma(n + 1))
    for relative in (1e-7, 1e-5, 1e-3):
        mu = estimate * scale * (1 + relative)
        shifted = grams.mul(-scale)
        shifted.diagonal(dim1=1, dim2=2).add_(mu)
        _, info = torch.linalg.cholesky_ex(shifted)
        if bool((info == 0).all()):
            return torch.tensor(mu * slack / scale, dtype=torch.float64)
    return None


def conv_norm_bound(weight: torch.Tensor, op: ConvOperator, iterations: int = DEFAULT_GRAM_ITERATIONS,
                    dense_limit: int = DENSE_LIMIT) -> torch.Tensor:
    """Certified upper bound on the operator norm of ``op``'s zero-padded conv with ``weight`` (float64 scalar).

    The smaller of the circular bound and, where the Gram matrix's side is at most ``dense_limit`` (0: never), the
    verified dense one.
    """
    op.output_shape(weight)  # refuses geometries with an empty output
    circular = gram_norm_bound(_polyphase_symbols(weight.detach(), op), iterations).max()
    dense = dense_conv_norm_bound(weight, op, dense_limit)
    return circular if dense is None else torch.minimum(circular, dense)


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
