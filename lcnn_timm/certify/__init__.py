"""Certified guarantees for LCNNs: Lipschitz and input-Hessian bounds of logit differences, L2 radii."""
from .bounds import Certificate, MapBound, certify, model_input_shape
from .gamma_cap import cap_gamma, clamp_gammas_
from .operator_norm import conv_norm_bound, gram_norm_bound, layer_norm_bound
from .structure import UnsupportedStructureError
