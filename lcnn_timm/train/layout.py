"""How one run spreads over its processes: one recipe at any world size (issue 31).

A config's ``batch_size`` is the **global** batch, the examples of one optimiser step, whatever the number of
processes: ``torchrun --nproc_per_node 2`` gives each process half of it, so the run takes the single-process
run's optimiser steps at its learning rate. ``batch_size_scope: per_process`` says explicitly that ``batch_size``
is each process's share (timm ``train.py``'s meaning). A resumed run keeps its checkpoint's global batch.
Standard library only.
"""
from dataclasses import asdict, dataclass
from typing import Optional

from .config import TrainConfig

__all__ = ["Layout", "global_batch", "split_batch", "world_change_problem"]


@dataclass(frozen=True)
class Layout:
    """What a run folder records about the processes that trained it (``layout`` in its records)."""

    world_size: int
    nnodes: int
    global_batch: int
    per_process_batch: int
    threads: int  # torch's intra-op threads per process: results depend on it (docs/training.md, determinism)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The line a run prints at start-up."""
        processes = f"{self.world_size} process{'es' * (self.world_size > 1)}"
        nodes = f" on {self.nnodes} nodes" if self.nnodes > 1 else ""
        return (f"layout: {processes}{nodes}, global batch {self.global_batch} = {self.world_size} x "
                f"{self.per_process_batch} per process, {self.threads} thread{'s' * (self.threads > 1)} per process")


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """The examples of one optimiser step that ``cfg`` asks for at ``world_size`` processes."""
    return cfg.batch_size * world_size if cfg.batch_size_scope == "per_process" else cfg.batch_size


def split_batch(batch: int, world_size: int) -> int:
    """Each process's share of the global ``batch``; ValueError if the processes cannot share it equally.

    Gradient accumulation would not help: ``world_size`` processes of ``k`` micro-batches of ``m`` examples make
    ``world_size * k * m``, still a multiple of ``world_size``.
    """
    if batch % world_size:
        below = batch // world_size * world_size
        nearest = " or ".join(str(b) for b in (below, below + world_size) if b)
        raise ValueError(f"batch_size {batch} (the global batch) does not split over {world_size} processes: use "
                         f"{nearest}, or batch_size_scope: per_process to give each process batch_size examples")
    return batch // world_size


def world_change_problem(saved: dict, world_size: int, allowed: bool) -> Optional[str]:
    """Why a checkpoint trained with the ``saved`` layout may not continue at ``world_size`` processes, or None."""
    if saved["world_size"] == world_size or allowed:
        return None
    return (f"--resume: this run was trained by {saved['world_size']} process(es) (global batch "
            f"{saved['global_batch']}); this launch has {world_size}, which would continue it as another run. "
            f"Launch it as before, or set allow_world_size_change: true to continue with {world_size} at global "
            f"batch {saved['global_batch']}")
