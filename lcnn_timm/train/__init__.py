"""LCNN training: the regularised timm task, the config format, the trainer and its CLI."""
from .config import TrainConfig, load_config, parse_overrides
from .precision import PrecisionChoice, choose_precision, has_native_bf16
from .regularizers import cure_penalty, gradreg_exact, gradreg_finite_difference, pgd_l2
from .task import AdversarialConfig, LCNNTask
from . import upstream
from .trainer import NonFiniteLossError, Trainer, TrainingInterrupted, TrainSetupError, param_groups, train
