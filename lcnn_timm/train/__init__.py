"""LCNN training: the regularised timm task, the config format, the trainer and its CLI."""
from .config import TrainConfig, load_config, parse_overrides
from .regularizers import cure_penalty, gradreg_exact, gradreg_finite_difference, pgd_l2
from .task import AdversarialConfig, LCNNTask
from .trainer import NonFiniteLossError, Trainer, param_groups, train
