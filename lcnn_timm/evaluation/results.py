"""``results.json``: the versioned record of one evaluation (schema in docs/evaluation.md).

Model cards and README tables are built from it, so every number sits next to
the protocol that produced it, and ``schema_version`` changes whenever a key is
renamed or its meaning changes (adding keys does not bump it).
"""
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Dict

import torch

from ..train.checkpoint import atomic_write_text

__all__ = ["READABLE_SCHEMA_VERSIONS", "SCHEMA_VERSION", "check_schema_version", "curvature_protocol", "environment",
           "load_per_example", "load_results", "new_results", "write_per_example", "write_results"]

# 2: curvature by Lanczos; "iterations" counts Lanczos steps (= HVPs per example), "method" is an object.
# 1: curvature by power iteration; "iterations" counted power steps (iterations + 1 HVPs), "method" a sentence.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)


def environment(device: torch.device) -> Dict[str, Any]:
    """Package versions and hardware the numbers were measured with."""
    import timm

    import lcnn_timm

    env = {
        "lcnn_timm": lcnn_timm.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def new_results(model: Dict[str, Any], dataset: Dict[str, Any], env: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """An empty results document; metrics are added under ``results['metrics'][name]``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "dataset": dataset,
        "seed": seed,
        "environment": env,
        "metrics": {},
    }


def _write_json(path: str, document: Any) -> None:
    """Write atomically (temp file + rename), so an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(Path(path), json.dumps(document, indent=2, allow_nan=False) + "\n")


def write_results(path: str, results: Dict[str, Any]) -> None:
    """Write a results document atomically."""
    _write_json(path, results)


def write_per_example(path: str, curvature: torch.Tensor) -> None:
    """The per-example C_f values behind the curvature statistics, in evaluation order (for distribution plots)."""
    _write_json(path, {"schema_version": SCHEMA_VERSION, "curvature": curvature.double().cpu().tolist()})


def load_per_example(path: str) -> torch.Tensor:
    """Per-example C_f values written by :func:`write_per_example`."""
    with open(path, encoding="utf-8") as f:
        return torch.tensor(json.load(f)["curvature"], dtype=torch.float64)


def check_schema_version(results: Dict[str, Any], source: str = "results.json") -> int:
    """The document's ``schema_version``; a ValueError naming ``source`` if this package cannot read it."""
    version = results.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(f"{source}: results schema_version {version!r} is not supported "
                         f"(this package reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))})")
    return version


def curvature_protocol(block: Dict[str, Any], version: int) -> str:
    """How a curvature block's ``||H||`` was estimated, in words (e.g. for model cards)."""
    steps = block["iterations"]
    if version == 1:  # worded as before, so cards built from schema-1 files do not change
        return f"{steps} Hessian-vector power iterations"
    return f"{steps} Lanczos steps ({steps} HVPs, largest-magnitude Ritz value)"


def load_results(path: str) -> Dict[str, Any]:
    """Read a results.json, refusing schema versions this package does not know."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    check_schema_version(results, path)
    return results
