"""LCNN layers: centered softplus, Softplus MaxMin, gamma-Lipschitz BatchNorm, operator spectral norm, halves block."""
from .centered_softplus import CenteredSoftplus, PositiveSoftplus, centered_softplus, compiled_centered_softplus
from .gamma_batchnorm import GammaBatchNorm1d, GammaBatchNorm2d, batchnorm_lipschitz
from .halves_residual import FoldedHalvesResidual, HalvesResidual
from .softplus_maxmin import SoftplusMaxMin
from .spectral_norm import (
    ConvOperator,
    LinearOperator,
    OperatorSpectralNorm,
    is_spectral_normalized,
    normalized_layer_norms,
    operator_norm,
    refresh_spectral_norms,
    remove_spectral_norms,
    scriptable_copy,
    spectral_norm,
)
