"""A loader over a dataset held as one uint8 tensor: deterministic, shardable, resumable.

The shuffle order of an epoch depends only on ``(seed, epoch)`` and the
augmentation of a batch only on ``(seed, epoch, batch index)``, so
resuming at any batch of any epoch replays exactly the same batches. Under DDP the
ranks split each global batch (``batch_size * world_size`` examples) of that one order
and augment their parts with that one batch's draws: step ``s`` trains on the same
augmented images at any world size.
"""
import math
from typing import Iterator, Optional, Sequence, Tuple

import torch

from .gpu_augment import random_crop_flip, to_float

__all__ = ["TensorLoader"]


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (distinct tuples give unrelated streams)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = ((value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class TensorLoader:
    """Batches of ``(float images, int64 labels)`` on ``device`` from uint8 ``images`` (N, C, H, W).

    Args:
        train: shuffle every epoch and apply random crop (``padding``) + flip (``hflip``).
        batch_size: examples per rank and batch (the global batch is ``batch_size * world_size``).
        rank, world_size: DDP sharding. Training: every rank gets ``ceil(N / world_size)``
            examples (the order is padded by wrapping around, like ``DistributedSampler``),
            so all ranks run the same number of steps; rank ``r`` takes the ``r``-th equal part
            of each global batch. Evaluation: ranks split the examples exactly, without repeats.
        drop_last: drop the last incomplete batch (the paper keeps it).
    """

    def __init__(
            self,
            images: torch.Tensor,
            labels: torch.Tensor,
            batch_size: int,
            train: bool,
            device: torch.device = torch.device("cpu"),
            seed: int = 0,
            padding: int = 4,
            hflip: float = 0.5,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            channels_last: bool = False,
            rank: int = 0,
            world_size: int = 1,
            drop_last: bool = False,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"need one label per image, got {tuple(labels.shape)} for {len(images)} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.device, self.seed = batch_size, train, torch.device(device), seed
        self.padding, self.hflip, self.mean, self.std = padding, hflip, mean, std
        self.channels_last, self.rank, self.world_size, self.drop_last = channels_last, rank, world_size, drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def num_samples(self) -> int:
        """Examples this rank sees per epoch."""
        if self.train:
            return math.ceil(len(self.images) / self.world_size)
        return len(range(self.rank, len(self.images), self.world_size))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (shuffle order and augmentation) and the batch to start from."""
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> torch.Tensor:
        count = len(self.images)
        if self.train:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        if not self.train:
            return order[self.rank:: self.world_size].to(self.device)
        total = self.num_samples * self.world_size
        return (torch.cat([order, order[: total - count]]) if total > count else order).to(self.device)

    def _part(self, indices: torch.Tensor, batch: int) -> Tuple[torch.Tensor, int, int]:
        """This rank's indices of ``batch``, where they start in the global batch, and the global batch's size.

        Training batches are cut from the whole (padded) order, ``batch_size * world_size`` at a time, and each
        rank takes its equal part (global batches hold a multiple of ``world_size`` examples: the padding sees to
        it); evaluation batches are cut from this rank's own share."""
        if not self.train:
            return indices[batch * self.batch_size: (batch + 1) * self.batch_size], 0, 0
        size = self.batch_size * self.world_size
        whole = indices[batch * size: (batch + 1) * size]
        part = len(whole) // self.world_size
        return whole[self.rank * part: (self.rank + 1) * part], self.rank * part, len(whole)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices()
        for batch in range(self.start_batch, len(self)):
            index, first, drawn = self._part(indices, batch)
            images = self.images[index]
            if self.train:
                # seeded without the rank (rank 0's stream of old): every rank draws the whole global batch's crops
                generator = torch.Generator(device=self.device)
                generator.manual_seed(_mix(self.seed, self.epoch, 0, batch))
                images = random_crop_flip(images, self.padding, self.hflip, generator, first=first, drawn=drawn)
            yield to_float(images, self.mean, self.std, self.channels_last), self.labels[index]
        self.start_batch = 0
