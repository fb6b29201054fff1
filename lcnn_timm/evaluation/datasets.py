"""Evaluation data: ``NAME[:split]`` -> a deterministic subset of [0, 1] images, batched.

Real datasets come from :func:`lcnn_timm.data.load_eval_dataset`; ``synthetic``
is a fixed-seed random dataset shaped for the model, for tests and smoke runs.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["EvalData", "SyntheticDataset", "load_eval_data", "parse_dataset_spec"]

SYNTHETIC = "synthetic"
KNOWN_DATASETS = ("cifar10", "cifar100", "fashion_mnist", SYNTHETIC)
DEFAULT_SPLIT = "test"


class SyntheticDataset(Dataset):
    """``size`` uniform-random ``input_size`` images with random labels, fixed by ``seed``."""

    def __init__(self, size: int, input_size: Sequence[int], num_classes: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, *input_size, generator=generator)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass
class EvalData:
    """A batched evaluation subset and the facts results.json records about it."""

    loader: DataLoader
    info: Dict[str, Any]

    @property
    def count(self) -> int:
        return self.info["count"]

    def head(self, count: Optional[int]) -> "EvalData":
        """The first ``count`` examples of this subset (all of them when ``count`` is None or larger)."""
        if count is None or count >= self.count:
            return self
        if count < 1:
            raise ValueError(f"--costly-count must be >= 1, got {count}")
        loader = DataLoader(Subset(self.loader.dataset, range(count)), batch_size=self.loader.batch_size,
                            shuffle=False, collate_fn=self.loader.collate_fn)
        info = dict(self.info, count=count, selection=f"first {count} of {self.info['total']} examples in dataset order")
        return EvalData(loader, info)


def parse_dataset_spec(spec: str) -> Tuple[str, str]:
    """``'cifar100:test'`` -> ``('cifar100', 'test')``; the split defaults to 'test'."""
    name, _, split = spec.partition(":")
    if not name:
        raise ValueError(f"empty dataset name in {spec!r}; valid: {', '.join(KNOWN_DATASETS)} "
                         "or a timm dataset spec such as torch/cifar10")
    return name, split or DEFAULT_SPLIT


def _canonical_name(name: str) -> str:
    if name == SYNTHETIC or "/" in name:  # "/" = a timm create_dataset spec (torch/..., hfds/...)
        return name
    from lcnn_timm.data import resolve_dataset_name

    canonical = resolve_dataset_name(name)
    if canonical is None:
        raise ValueError(
            f"unknown dataset {name!r}; valid: {', '.join(KNOWN_DATASETS)} "
            "(also Hub/timm spellings such as uoft-cs/cifar100, or a timm dataset spec such as torch/cifar10)"
        )
    return canonical


def _to_unit_float(batch: List[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.as_tensor(image) for image, _ in batch])
    images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    return images, torch.tensor([int(label) for _, label in batch])


def _subset_size(total: int, count: Optional[int], fraction: Optional[float]) -> int:
    if count is not None and fraction is not None:
        raise ValueError("give --count or --fraction, not both")
    if count is not None:
        if count < 1:
            raise ValueError(f"--count must be >= 1, got {count}")
        return min(count, total)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
        return max(1, round(fraction * total))
    return total


def load_eval_data(
        spec: str,
        data_dir: Optional[str] = None,
        count: Optional[int] = None,
        fraction: Optional[float] = None,
        batch_size: int = 64,
        input_size: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        seed: int = 0,
) -> EvalData:
    """The first ``count`` (or ``fraction`` of the) examples of ``spec`` in dataset order, batched.

    ``input_size`` and ``num_classes`` shape the synthetic dataset (256 images).
    """
    name, split = parse_dataset_spec(spec)
    canonical = _canonical_name(name)
    if canonical == SYNTHETIC:
        dataset = SyntheticDataset(256, input_size, num_classes, seed)
    else:
        from lcnn_timm.data import load_eval_dataset

        dataset = load_eval_dataset(name, split, data_dir)
    total = len(dataset)
    size = _subset_size(total, count, fraction)
    loader = DataLoader(Subset(dataset, range(size)), batch_size=batch_size, shuffle=False, collate_fn=_to_unit_float)
    info = {
        "name": canonical, "split": split, "data_dir": data_dir, "count": size, "total": total,
        "selection": f"first {size} of {total} examples in dataset order",
    }
    if canonical == SYNTHETIC:
        info["seed"] = seed
    return EvalData(loader, info)
