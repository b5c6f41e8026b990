"""Datasets: synthetic always; CIFAR-10's on-disk format written by the test; Fashion-MNIST where installed."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lrx.data import DEBIAN_FASHION_MNIST, Batches, load_split, subset, synthetic
from lrx.errors import UserError


def test_synthetic_is_deterministic_and_uint8():
    a, la = synthetic(64, 16, seed=3)
    b, lb = synthetic(64, 16, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 16, 16)
    assert torch.equal(a, b) and torch.equal(la, lb), "same seed, same data"
    assert not torch.equal(a, synthetic(64, 16, seed=4)[0]), "another seed, other data"


def test_batches_resize_normalise_and_cover_every_image():
    images, labels = synthetic(100, 16)
    batches = Batches(images, labels, batch_size=32, image_size=24, shuffle=True, seed=0)
    seen = []
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 24, 24)
        seen.append(y)
    assert len(batches) == 4 and sum(len(y) for y in seen) == 100
    assert sorted(torch.cat(seen).tolist()) == sorted(labels.tolist())
    first = [y for _, y in batches]
    batches.set_epoch(1)
    assert not torch.equal(torch.cat(first), torch.cat([y for _, y in batches])), "another epoch, another order"
    batches.set_epoch(0)
    assert torch.equal(torch.cat(first), torch.cat([y for _, y in batches])), "the same epoch, the same order"
    x, _ = next(iter(Batches(images, labels, 100, 16)))
    mean = x.mean(dim=(0, 2, 3))
    expected = (images.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, (expected - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]),
                          atol=1e-4), "ImageNet normalisation"


def test_shards_split_an_epoch_between_ranks():
    images, labels = synthetic(10, 8)
    batches = Batches(images, labels, 4, 8, shuffle=True, seed=1)
    parts = [torch.cat([y for _, y in batches.shard(r, 2)]) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 5
    assert sorted(torch.cat(parts).tolist()) == sorted(labels.tolist())


def test_subset_is_fixed_by_seed():
    images, labels = synthetic(50, 8)
    a = subset(images, labels, 10, seed=0)[1]
    assert torch.equal(a, subset(images, labels, 10, seed=0)[1]) and len(a) == 10
    assert len(subset(images, labels, None, 0)[1]) == 50


def write_cifar10(root: Path, per_batch: int = 4) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": list(range(per_batch))}, fh)


def test_cifar10_reads_its_own_on_disk_format(tmp_path):
    write_cifar10(tmp_path)
    images, labels = load_split("cifar10", tmp_path, "train", download=False)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == list(range(4)) * 5
    test_images, _ = load_split("cifar10", tmp_path, "test", download=False)
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb"))["data"]
    assert torch.equal(test_images[0], torch.from_numpy(raw[0].reshape(3, 32, 32))), "channel-first, as torchvision"


def test_cifar10_missing_offline_says_where_to_put_it(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match=f"cifar-10-batches-py under {tmp_path}"):
        load_split("cifar10", tmp_path, "train", download=True)
    with pytest.raises(UserError, match="CIFAR-10 is missing"):
        load_split("cifar10", tmp_path, "train", download=False)


def test_fashion_mnist_reads_idx_files_from_the_data_root(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + images.tobytes())
    (folder / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 7]))
    x, y = load_split("fashion-mnist", tmp_path, "test", download=False)
    assert x.shape == (2, 3, 28, 28), "grayscale repeated to 3 channels"
    assert torch.equal(x[1, 2], torch.from_numpy(images[1])) and y.tolist() == [3, 7]


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    x, y = load_split("fashion-mnist", tmp_path, "test", download=False)
    assert x.shape == (10000, 3, 28, 28) and set(y.tolist()) == set(range(10))


def test_data_root_precedence(monkeypatch):
    from lrx.data import data_root

    monkeypatch.delenv("LRX_DATA", raising=False)
    assert data_root("cfg") == Path("cfg"), "the config's data.root by default"
    monkeypatch.setenv("LRX_DATA", "/env")
    assert data_root("cfg") == Path("/env"), "LRX_DATA over the config"
    assert data_root("cfg", "/flag") == Path("/flag"), "--data-root over both"
