"""AutoAttack (Croce & Hein, 2020) through the ``pyautoattack`` package, an optional dependency.

``pyautoattack`` is the PyPI packaging of the authors' fra31/auto-attack code
(pure PyTorch; checked with torch 2.14). The standard version runs APGD-CE,
APGD-T (needs at least 4 classes), FAB-T and Square; inputs stay in [0, 1].
"""
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from ..curvature.estimator import batches_on_device, frozen_parameters, model_device

__all__ = ["autoattack_accuracy"]

_NORMS = {"l2": "L2", "linf": "Linf", "l1": "L1"}
_VERSIONS = ("standard", "plus", "rand")


def autoattack_accuracy(
        model: nn.Module,
        loader: Iterable,
        eps: float,
        norm: str = "l2",
        version: str = "standard",
        seed: int = 0,
        max_examples: Optional[int] = None,
        progress: bool = True,
) -> Dict[str, Any]:
    """Top-1 accuracy (percent) under AutoAttack, with the protocol that produced it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise ValueError("AutoAttack needs the optional package 'pyautoattack' (pip install pyautoattack)") from e
    if norm not in _NORMS or version not in _VERSIONS:
        raise ValueError(f"AutoAttack norm must be one of {tuple(_NORMS)} and version one of {_VERSIONS}, "
                         f"got norm={norm!r}, version={version!r}")
    if model.training:
        raise ValueError("AutoAttack evaluation runs with the model in eval mode (call model.eval())")
    device = model_device(model)
    attack = AutoAttack(model, norm=_NORMS[norm], eps=eps, version=version, device=device, seed=seed)
    correct = count = 0
    with frozen_parameters(model):
        for x, y in batches_on_device(loader, max_examples, device, f"AutoAttack {norm} eps={eps:g}", progress):
            adv, _ = attack.run_standard_evaluation(x, y, batch_size=x.shape[0])
            with torch.no_grad():
                correct += (model(adv).argmax(dim=1) == y).sum().item()
            count += x.shape[0]
    if count == 0:
        raise ValueError("autoattack_accuracy: the loader yielded no examples")
    return {"attack": f"AutoAttack-{version}", "norm": norm, "eps": float(eps), "seed": seed,
            "accuracy": 100.0 * correct / count, "count": count}
