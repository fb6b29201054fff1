"""Adversarial robustness on [0, 1] inputs: PGD (L2 / Linf), AutoAttack via the optional pyautoattack."""
from .pgd import DEFAULT_L2_EPS, NORMS, adversarial_accuracy, pgd_attack, pgd_sweep
from .autoattack import autoattack_accuracy
