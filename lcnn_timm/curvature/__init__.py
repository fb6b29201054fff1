"""Curvature penalty (training), the paper's Theorem-1 expression (not a bound) and measurement."""
from .proxy import ProxyTerms, UnsupportedStructureError, curvature_proxy, layer_proxy
from .double_backward import lean_double_backward
from .penalty import CurvaturePenalty, add_penalty_to_backward, curvature_penalty, lcnn_parameters, penalty_weights
from .estimator import (
    CurvatureEstimate,
    CurvatureNotMeaningfulWarning,
    DEFAULT_LANCZOS_STEPS,
    curvature_statistics,
    estimate_curvature,
    frozen_parameters,
    gradient_stability,
    gradient_stability_statistics,
    piecewise_linear_modules,
)
