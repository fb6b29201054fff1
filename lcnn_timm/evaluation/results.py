"""``results.json``: the versioned record of one evaluation (schema in docs/evaluation.md).

Model cards and README tables are built from it, so every number sits next to
the protocol that produced it, and ``schema_version`` changes whenever a key is
renamed or its meaning changes (adding keys does not bump it).
"""
import datetime
import json
import os
import platform
import tempfile
from typing import Any, Dict

import torch

__all__ = ["SCHEMA_VERSION", "environment", "load_per_example", "load_results", "new_results", "write_per_example",
           "write_results"]

SCHEMA_VERSION = 1


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
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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


def load_results(path: str) -> Dict[str, Any]:
    """Read a results.json, refusing schema versions this package does not know."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    version = results.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: results schema_version {version!r} is not supported (this package writes {SCHEMA_VERSION})")
    return results
