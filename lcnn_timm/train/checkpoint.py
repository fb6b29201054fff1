"""Crash-safe checkpoints: weights as safetensors plus a resume-state file, committed by one atomic rename.

A checkpoint ``ckpt-<step>`` is the pair ``ckpt-<step>.safetensors`` (model
weights) and ``ckpt-<step>.state.pt`` (optimizer, scheduler, EMA, RNG and loader
position). Both are written as temp files and renamed, then ``last.json`` is
atomically replaced to point at the pair; only then are older pairs deleted,
except the previous one, kept as a fallback should the newest prove unreadable
(a disk filling up, a copy cut short). A kill at any moment therefore leaves
``last.json`` naming a complete pair.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .paths import POINTER, checkpoint_candidates, checkpoint_stem, unwritable_reason  # re-exported

__all__ = ["CheckpointError", "atomic_write_text", "checkpoint_candidates", "checkpoint_path", "default_file_mode",
           "describe_mismatch", "load_checkpoint", "save_checkpoint", "save_weights", "unwritable_reason"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or truncated."""


def default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` gives a new file (safetensors and mkstemp use 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: Path, write) -> None:
    """``write(tmp)``, fsync, rename over ``path``; on failure the temp file is removed and ``path`` is untouched.
    The file gets the usual mode (0644 under umask 022), whatever mode the writer created it with."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename."""
    _atomic(Path(path), lambda tmp: tmp.write_text(text))


def save_weights(path: Path, state_dict: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Atomically write a state dict as safetensors (tensors made contiguous and unshared)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def checkpoint_path(directory: Path, step: int) -> Path:
    """The weights file of checkpoint ``step`` in ``directory`` (its resume state sits beside it)."""
    return Path(directory) / f"ckpt-{step:09d}.safetensors"


def save_checkpoint(directory: Path, step: int, weights: Dict[str, torch.Tensor], state: Dict[str, Any],
                    previous: Optional[Path] = None) -> Path:
    """Write checkpoint ``step`` into ``directory``, point ``last.json`` at it, delete older ones but ``previous``."""
    directory = Path(directory)
    name = checkpoint_stem(checkpoint_path(directory, step))
    save_weights(directory / f"{name}.safetensors", weights, metadata={"step": str(step)})
    _atomic(directory / f"{name}.state.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_text(directory / POINTER, json.dumps({"checkpoint": name, "step": step}))
    keep = {name} | ({checkpoint_stem(Path(previous))} if previous is not None else set())
    for old in directory.glob("ckpt-*"):
        if old.name.split(".", 1)[0] not in keep:
            old.unlink(missing_ok=True)
    return directory / f"{name}.safetensors"


def load_checkpoint(weights_path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The (weights, resume state) pair of a checkpoint; :class:`CheckpointError` if either is missing or unreadable."""
    weights_path = Path(weights_path)
    state_path = weights_path.with_name(f"{checkpoint_stem(weights_path)}.state.pt")
    if not weights_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"checkpoint {weights_path} is incomplete: need it and {state_path.name}")
    try:
        return load_file(str(weights_path)), torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as error:  # safetensors, pickle and zip readers each raise their own types for a damaged file
        reason = str(error).split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {weights_path.name} is unreadable ({reason})") from error


def describe_mismatch(expected: Dict[str, torch.Tensor], found: Dict[str, torch.Tensor], limit: int = 3) -> str:
    """A one-line summary of how state dict ``found`` differs from ``expected`` ('' if it matches): counts of missing,
    unexpected and wrongly shaped entries, with the first ``limit`` names of each."""
    def listing(what: str, keys: List[str]) -> str:
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return f"{len(keys)} {what} ({', '.join(keys[:limit])}{more})"

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in found and found[k].shape != v.shape]
    parts = [listing(what, keys) for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys]
    return "; ".join(parts)
