"""Batched training augmentation as tensor ops on the training device.

Random crop with zero padding plus horizontal flip (the paper's CIFAR recipe),
done for a whole uint8 batch with one gather, so a small-image pipeline costs a
fraction of a model step.
"""
from typing import Optional, Sequence

import torch

__all__ = ["random_crop_flip", "to_float"]


def random_crop_flip(
        images: torch.Tensor,
        padding: int = 4,
        hflip: float = 0.5,
        generator: Optional[torch.Generator] = None,
        first: int = 0,
        drawn: Optional[int] = None,
) -> torch.Tensor:
    """Pad ``images`` (B, C, H, W) by ``padding`` zeros, crop back to (H, W) at random offsets, flip with prob ``hflip``.

    Every example gets its own offsets and flip, drawn from ``generator``
    (which must live on ``images.device``). Works on any dtype; no copy of the
    padded batch is kept. ``drawn`` (default B) draws for that many examples and ``images`` takes the draws
    ``first`` to ``first + B``: a DDP rank augments its slice of the global batch exactly as one process would.
    """
    batch, _, height, width = images.shape
    device = images.device
    if padding < 0 or not 0.0 <= hflip <= 1.0:
        raise ValueError(f"need padding >= 0 and 0 <= hflip <= 1, got padding={padding}, hflip={hflip}")
    padded = torch.nn.functional.pad(images, (padding,) * 4) if padding else images
    drawn, mine = drawn or batch, slice(first, first + batch)
    offset_y = torch.randint(0, 2 * padding + 1, (drawn, 1), device=device, generator=generator)[mine]
    offset_x = torch.randint(0, 2 * padding + 1, (drawn, 1), device=device, generator=generator)[mine]
    flip = (torch.rand(drawn, 1, device=device, generator=generator) < hflip)[mine]
    cols = torch.arange(width, device=device).expand(batch, width)
    cols = torch.where(flip, width - 1 - cols, cols) + offset_x
    rows = torch.arange(height, device=device).expand(batch, height) + offset_y
    index = torch.arange(batch, device=device)[:, None, None]
    # advanced indexing puts the indexed dims first: (B, H, W, C)
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def to_float(
        images: torch.Tensor,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1], optionally normalised by per-channel ``mean``/``std``."""
    out = images.float().div_(255.0)
    if mean is not None or std is not None:
        channels = out.shape[1]
        mean_t = torch.as_tensor(mean if mean is not None else [0.0] * channels, device=out.device).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std if std is not None else [1.0] * channels, device=out.device).view(1, -1, 1, 1)
        out = out.sub_(mean_t).div_(std_t)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()
