"""lcnn-timm: Low-Curvature Neural Networks for timm.

``import lcnn_timm`` registers the LCNN models in timm's registry and exposes the documented submodules
(``lcnn_timm.export.freeze``, ``lcnn_timm.train.Trainer``, ...) without further imports.
"""
from . import certify, convert, curvature, data, evaluation, export, hub, layers, robustness, train
from . import models  # registers the models with timm
from .convert import ConversionReport, convert_model
from .curvature import curvature_penalty, curvature_proxy
from .layers import CenteredSoftplus, GammaBatchNorm1d, GammaBatchNorm2d, HalvesResidual, spectral_norm

__version__ = "0.1.0"

train.upstream.warn_ignored_config_keys()  # under timm's train.py (device_modules: [lcnn_timm]); else nothing
