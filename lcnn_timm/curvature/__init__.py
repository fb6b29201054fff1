"""Curvature penalty (training), upper bound (theory) and measurement."""
from .bound import LayerBound, UnsupportedStructureError, curvature_upper_bound, layer_bound
from .penalty import CurvaturePenalty, curvature_penalty, lcnn_parameters
