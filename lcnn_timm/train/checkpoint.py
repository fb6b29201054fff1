"""Crash-safe checkpoints: weights as safetensors plus a resume-state file, committed by one atomic rename.

A checkpoint ``ckpt-<step>`` is the pair ``ckpt-<step>.safetensors`` (model
weights) and ``ckpt-<step>.state.pt`` (optimizer, scheduler, EMA, RNG and loader
position). Both are written as temp files and renamed, then ``last.json`` is
atomically replaced to point at the pair; only then are older pairs deleted.
A kill at any moment therefore leaves ``last.json`` naming a complete pair.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

__all__ = ["atomic_write_text", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "save_weights"]

POINTER = "last.json"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename."""
    _atomic(Path(path), lambda tmp: tmp.write_text(text))


def save_weights(path: Path, state_dict: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Atomically write a state dict as safetensors (tensors made contiguous and unshared)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_checkpoint(directory: Path, step: int, weights: Dict[str, torch.Tensor], state: Dict[str, Any]) -> Path:
    """Write checkpoint ``step`` into ``directory``, point ``last.json`` at it, delete older ones."""
    directory = Path(directory)
    name = f"ckpt-{step:09d}"
    save_weights(directory / f"{name}.safetensors", weights, metadata={"step": str(step)})
    _atomic(directory / f"{name}.state.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_text(directory / POINTER, json.dumps({"checkpoint": name, "step": step}))
    for old in directory.glob("ckpt-*"):
        if not old.name.startswith(name + "."):
            old.unlink(missing_ok=True)
    return directory / f"{name}.safetensors"


def latest_checkpoint(path: Path) -> Optional[Path]:
    """The weights file of the checkpoint a folder's ``last.json`` names (or ``path`` itself if it is one)."""
    path = Path(path)
    if path.is_file():
        return path
    pointer = path / POINTER
    if not pointer.is_file():
        return None
    return path / f"{json.loads(pointer.read_text())['checkpoint']}.safetensors"


def load_checkpoint(weights_path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The (weights, resume state) pair of a checkpoint."""
    weights_path = Path(weights_path)
    state_path = weights_path.with_name(weights_path.name.replace(".safetensors", ".state.pt"))
    if not weights_path.is_file() or not state_path.is_file():
        raise FileNotFoundError(f"checkpoint {weights_path} is incomplete: need it and {state_path.name}")
    return load_file(str(weights_path)), torch.load(state_path, map_location="cpu", weights_only=False)
