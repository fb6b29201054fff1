"""Data loaders: synthetic CIFAR-layout Parquet and IDX directories, batched augmentation, loader determinism."""
import gzip
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lcnn_timm.data import TensorLoader, load_eval_dataset, load_image_tensors, random_crop_flip, read_idx


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return tmp_path


def test_idx_directory_round_trip(idx_dir):
    images, labels = load_image_tensors("fashion_mnist", "test", str(idx_dir))
    expected = read_idx(idx_dir / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], torch.from_numpy(expected.copy()))
    assert torch.equal(labels, torch.from_numpy(read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64)))
    image, label = load_eval_dataset("torch/fashion_mnist", "test", str(idx_dir))[2]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and image.max() <= 1.0
    assert torch.allclose(image * 255, images[2].float()) and label == int(labels[2])


def test_idx_rejects_bad_magic(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "x.gz")


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name,label_columns", [("cifar100", ("fine_label", "coarse_label")), ("cifar10", ("label",))])
def test_cifar_parquet_directory(tmp_path, name, label_columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    arrays = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    columns = {"img": [{"bytes": _png(a), "path": None} for a in arrays]}
    for i, column in enumerate(label_columns):
        columns[column] = [3 * i + k for k in range(4)]
    (tmp_path / name).mkdir()
    pq.write_table(pa.table(columns), tmp_path / name / "test-00000-of-00001.parquet")
    images, labels = load_image_tensors(f"hfds/uoft-cs/{name}", "test", str(tmp_path))
    assert torch.equal(images, torch.from_numpy(arrays).permute(0, 3, 1, 2))
    assert labels.tolist() == [0, 1, 2, 3]
    if name == "cifar100":
        assert load_image_tensors(name, "test", str(tmp_path), target_key="coarse_label")[1].tolist() == [3, 4, 5, 6]
    with pytest.raises(FileNotFoundError, match="train"):
        load_image_tensors(name, "train", str(tmp_path))


def test_random_crop_flip_matches_per_example_reference():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    out = random_crop_flip(images, padding=2, hflip=0.5, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 5, (2, 1), generator=generator)
    ox = torch.randint(0, 5, (2, 1), generator=generator)
    flip = torch.rand(2, 1, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        crop = padded[i, :, oy[i]: oy[i] + 5, ox[i]: ox[i] + 5]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_loader_is_deterministic_resumable_and_sharded():
    images = torch.randint(0, 256, (10, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(10)

    def batches(rank=0, world=1, start=0):
        loader = TensorLoader(images, labels, 3, train=True, seed=5, padding=2, rank=rank, world_size=world)
        loader.set_epoch(1, start)
        return list(loader)

    full = batches()
    assert len(full) == 4 and sorted(torch.cat([y for _, y in full]).tolist()) == list(range(10))
    resumed = batches(start=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], resumed))
    shards = [torch.cat([y for _, y in batches(rank, 2)]) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5 and set(torch.cat(shards).tolist()) == set(range(10))


def test_ranks_split_each_global_batch_as_one_process_trains_it():
    """Issue 31: a rank's batch is its part of the single-process batch of that step, crops and flips included."""
    images = torch.randint(0, 256, (10, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(10)

    def batches(per_rank, rank=0, world=1):
        loader = TensorLoader(images, labels, per_rank, train=True, seed=5, padding=2, rank=rank, world_size=world)
        loader.set_epoch(1)
        return list(loader)

    one = batches(4)  # global batches of 4, 4 and 2
    two = [batches(2, rank, 2) for rank in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for step, (images_one, labels_one) in enumerate(one):
        assert torch.equal(torch.cat([two[0][step][1], two[1][step][1]]), labels_one)
        assert torch.equal(torch.cat([two[0][step][0], two[1][step][0]]), images_one)
