"""Where a run reads and writes: its output folder, its dataset folder and its checkpoints.

Standard library only (and the config schema), so that ``lcnn-timm train`` checks every path before it imports
torch (:func:`preflight`, called by :func:`lcnn_timm.train.cli.prepare`); the trainer runs the same checks.
"""
import json
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from ..data.names import DEFAULT_FASHION_MNIST_DIR, resolve_dataset_name
from .config import TrainConfig
from .run_lock import RunFolderBusy, RunLock

__all__ = ["POINTER", "checkpoint_candidates", "checkpoint_stem", "data_dir_problem", "output_dir", "output_file_reason",
           "preflight", "resume_folder", "resume_problem", "unwritable_reason"]

POINTER = "last.json"  # names the newest complete checkpoint of a run folder


def output_dir(cfg: TrainConfig) -> Path:
    """The run's folder: ``output/experiment``, defaulting to ``output/train/<experiment or model-dataset>``."""
    if cfg.output:
        return Path(cfg.output) / cfg.experiment if cfg.experiment else Path(cfg.output)
    return Path("output") / "train" / (cfg.experiment or f"{cfg.model}-{resolve_dataset_name(cfg.dataset) or 'data'}")


def unwritable_reason(folder: Path) -> Optional[str]:
    """Why files cannot be written into ``folder`` (created if missing), or None if they can.

    Tries a real temporary file in ``folder`` or, if it does not exist yet, in its nearest existing parent (a
    read-only file system, a full disk's metadata or a missing permission all show); leaves nothing behind.
    """
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"cannot write in {existing}: {error.strerror or error}"
    return None


def output_file_reason(path: Path) -> Optional[str]:
    """Why a file cannot be written at ``path`` (an existing folder there, or an unwritable parent), or None."""
    path = Path(path).absolute()
    if path.is_dir():
        return f"{path} is a folder; give a file path, e.g. {path / 'results.json'}"
    return unwritable_reason(path.parent)


def data_dir_problem(cfg: TrainConfig) -> Optional[str]:
    """A data_dir written as a local path must exist: otherwise the loaders would try it as a Hub id (slowly,
    then failing with a message about the Hub)."""
    fashion = resolve_dataset_name(cfg.dataset) == "fashion_mnist"
    source = cfg.data_dir or (DEFAULT_FASHION_MNIST_DIR if fashion else None)
    if source and source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
        hint = "; install it with: apt-get install -y dataset-fashion-mnist" if source == DEFAULT_FASHION_MNIST_DIR \
            else "; set data_dir to the folder holding the dataset's files"
        return f"dataset {cfg.dataset!r}: data_dir {source} does not exist{hint}"
    return None


def checkpoint_stem(weights_path: Path) -> str:
    """``ckpt-000000042`` for ``ckpt-000000042.safetensors`` (and its ``.state.pt``)."""
    return weights_path.name.split(".", 1)[0]


def checkpoint_candidates(path: Path) -> List[Path]:
    """Weights files to resume from, best first: ``path`` itself if it is a file; else the checkpoint the folder's
    ``last.json`` names, then the folder's other ``ckpt-*.safetensors`` newest first (fallbacks)."""
    path = Path(path)
    if path.is_file():
        return [path]
    found = sorted(path.glob("ckpt-*.safetensors"), reverse=True) if path.is_dir() else []
    try:
        named = path / f"{json.loads((path / POINTER).read_text())['checkpoint']}.safetensors"
    except (OSError, ValueError, KeyError):  # no pointer (or a damaged one): the files alone decide
        return found
    return [named] * (named in found) + [p for p in found if p != named]


def resume_folder(cfg: TrainConfig) -> Path:
    """Where ``cfg.resume`` looks: the run's own folder for 'latest'/'auto', else the path given."""
    return output_dir(cfg) if cfg.resume in ("latest", "auto") else Path(cfg.resume)


def resume_problem(cfg: TrainConfig) -> Optional[str]:
    """Why ``cfg.resume`` cannot continue anything ('auto' may always start a new run), or None."""
    if not cfg.resume or cfg.resume == "auto" or checkpoint_candidates(resume_folder(cfg)):
        return None
    return (f"--resume: nothing to resume in {resume_folder(cfg)} (no checkpoint there); check output/experiment, "
            "or run without --resume to start a new run")


def _inputs_problem(cfg: TrainConfig) -> Optional[str]:
    """The first problem of what a run reads (initial checkpoint, data folder, resume target), or None."""
    if cfg.initial_checkpoint and not Path(cfg.initial_checkpoint).is_file():
        return (f"initial_checkpoint {cfg.initial_checkpoint} does not exist (a conversion row needs its source "
                "model trained first, e.g. configs/fashion_mnist_relu.yaml)")
    return data_dir_problem(cfg) or resume_problem(cfg)


def preflight(cfg: TrainConfig, primary: bool = True) -> Tuple[Optional[str], Optional[RunLock]]:
    """``(the run's first path problem, None)``, or ``(None, the run folder's lock)`` held for the caller to train.

    The writing process (``primary``: rank 0) checks the output folder, locks it, then checks what the run reads:
    a folder another live run holds is refused as such, "nothing to resume" included, and before any heavy work
    (``lcnn-timm train`` calls this before it imports torch). The other ranks check only the data folder
    (their lock is None). A lock taken for a run refused afterwards is released, with a folder it created.
    """
    if not primary:
        return data_dir_problem(cfg), None
    problem = unwritable_reason(output_dir(cfg))
    if problem:
        return f"output folder {output_dir(cfg)}: {problem}; choose a writable output", None
    lock = RunLock(output_dir(cfg))
    try:
        lock.acquire()
    except RunFolderBusy as error:
        return str(error), None
    problem = _inputs_problem(cfg)
    if problem:
        lock.release(discard=True)
        return problem, None
    return None, lock
