"""The model under evaluation: a timm model behind a [0, 1]-pixel normalisation wrapper.

As in RobustBench, attacks and derivatives act on [0, 1] pixels and the model's
mean/std normalisation lives inside the evaluated module, so eps and curvature
mean the same thing for every model whatever its preprocessing.
"""
import hashlib
import os
from typing import Any, Dict, Optional, Sequence

import timm
import torch
from torch import nn

__all__ = ["NormalizedModel", "create_eval_model", "file_sha256", "load_checkpoint_strict"]

# timm model names that carry their own weights
_WEIGHTED_PREFIXES = ("hf-hub:", "local-dir:")


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)`` for ``x`` in [0, 1]; mean and std are per-channel buffers."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one entry per channel and std > 0, got mean={mean}, std={std}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"the model normalises {self.mean.shape[1]} channel(s) but the images have {x.shape[1]}; "
                "pass --model-kwargs in_chans=N to match the dataset"
            )
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_checkpoint_strict(model: nn.Module, path: str) -> None:
    """Load a safetensors / torch checkpoint into ``model``; any mismatch is a ValueError naming the keys.

    Dict checkpoints wrapping the weights under ``state_dict`` or ``model`` are
    unwrapped and ``module.`` prefixes dropped (timm's ``load_state_dict``).
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        state_dict = timm.models.load_state_dict(path, use_ema=False)
    except Exception as e:  # unreadable file: say which one and why
        raise ValueError(f"could not read checkpoint {path!r} (expected .safetensors, .pth or .pt): {e}") from e
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches: torch's message has a line per tensor (~100 for another width)
        from ..hub.push import check_state_dict

        check_state_dict(model, state_dict, f"checkpoint {path!r}")  # one line, as lcnn-timm push says it
        raise ValueError(f"checkpoint {path!r} does not match the model: {str(e).splitlines()[0]}") from e
    if result.missing_keys or result.unexpected_keys:
        problems = []
        if result.missing_keys:
            problems.append(f"missing keys: {_listing(result.missing_keys)}")
        if result.unexpected_keys:
            problems.append(f"unexpected keys: {_listing(result.unexpected_keys)}")
        raise ValueError(
            f"checkpoint {path!r} does not match the model ({'; '.join(problems)}); "
            "check the model name and --model-kwargs (e.g. num_classes, in_chans)"
        )


def _close_matches(name: str) -> str:
    """``; close matches: a, b`` from timm's registry (by substring, then by spelling), or nothing."""
    import difflib

    matches = timm.list_models(f"*{name}*")[:10] or difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(matches)}" if matches else "; no registered model has a similar name"


def create_eval_model(
        name: str,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        pretrained: Optional[bool] = None,
        convert: bool = False,
) -> NormalizedModel:
    """Build ``timm.create_model(name, **model_kwargs)``, load ``checkpoint``, wrap it, switch to eval mode.

    ``pretrained`` defaults to True for ``hf-hub:`` / ``local-dir:`` names (they
    exist to carry weights) and to False otherwise; a checkpoint is loaded on top.
    ``convert`` rebuilds the model as ``lcnn_timm.convert_model`` turned it into an LCNN (at its pretrained_cfg
    input size) before loading: the checkpoint of a ``convert: true`` training run.
    Mean and std come from the model's pretrained config.
    """
    if pretrained is None:
        pretrained = name.startswith(_WEIGHTED_PREFIXES) and checkpoint is None
    if not name.startswith(_WEIGHTED_PREFIXES) and not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}{_close_matches(name)}")
    model = timm.create_model(name, pretrained=pretrained, **(model_kwargs or {}))
    if convert:
        from ..convert import convert_model

        model, _ = convert_model(model, inplace=True, init_iterations=1)  # every value comes from the checkpoint
    if checkpoint is not None:
        load_checkpoint_strict(model, checkpoint)
    config = timm.data.resolve_model_data_config(model)
    return NormalizedModel(model, config["mean"], config["std"]).eval()
