"""Converting timm models into Low-Curvature Neural Networks."""
from .converter import convert_model
from .convs import WeightStandardization
from .report import Compensation, ConversionReport, LeftAlone, Replacement
