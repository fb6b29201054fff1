"""Curvature penalty (training), upper bound (theory) and measurement."""
from .bound import LayerBound, UnsupportedStructureError, curvature_upper_bound, layer_bound
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
