"""Adversarial robustness: PGD (L2 / Linf) on [0, 1] inputs."""
from .pgd import DEFAULT_L2_EPS, NORMS, adversarial_accuracy, pgd_attack, pgd_sweep
