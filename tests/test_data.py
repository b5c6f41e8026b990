"""Datasets: synthetic always; CIFAR-10's on-disk format written by the test; Fashion-MNIST where installed."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

import lrx.data.datasets
from conftest import write_yaml
from lrx.config.settings import TrainConfig, load_config
from lrx.data.datasets import DEBIAN_FASHION_MNIST, Batches, StreamBatches, load_data, load_split, subset, synthetic
from lrx.base.errors import UserError
from lrx.nn.models import build_model
from lrx.train.baseline import train_baseline


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
    from lrx.data.datasets import data_root

    monkeypatch.delenv("LRX_DATA", raising=False)
    assert data_root("cfg") == Path("cfg"), "the config's data.root by default"
    monkeypatch.setenv("LRX_DATA", "/env")
    assert data_root("cfg") == Path("/env"), "LRX_DATA over the config"
    assert data_root("cfg", "/flag") == Path("/flag"), "--data-root over both"


# ---------------------------------------------------------------- image folders, torchvision sets, streaming

CLASSES = ("cat", "dog", "eel")


def write_image_folder(root: Path, per_class: int = 6, size: int = 32) -> Path:
    """root/{train,val}/<class>/<i>.png: each class a colour of its own plus noise; odd sizes, to resize and crop."""

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = size + 3 * i, size + 2 * c
                base = np.zeros((h, w, 3), dtype=np.uint8)
                base[..., c] = 200
                pixels = np.clip(base + rng.integers(0, 55, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def folder_config(tmp_path: Path, images: Path, select_on: str = "test", **data):
    """A config reading ``images``; ``select_on: test`` by default: the training images are all of train/."""
    settings = {"name": "imagefolder", "root": str(images), "image_size": 24, "batch_size": 4, "test_batch_size": 4,
                "workers": 0, **data}
    return load_config(write_yaml(tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml",
                                  {"model": {"name": "tiny_cnn", "num_classes": 3}, "data": settings, "seed": 5,
                                   "select_on": select_on}))


def test_image_folder_decodes_resizes_and_keeps_the_training_labels(tmp_path):
    images = write_image_folder(tmp_path / "images")
    (images / "val" / "dog").rename(images / "val" / "zz-dog")  # a val folder must use the training classes
    with pytest.raises(UserError, match="classes the training folder lacks: zz-dog"):
        load_data(folder_config(tmp_path, images))
    (images / "val" / "zz-dog").rename(images / "val" / "dog")
    (images / "val" / "eel").rename(tmp_path / "eel")  # fewer classes in val: labels stay the training ones
    train, test = load_data(folder_config(tmp_path, images))
    assert train.images.shape == (18, 3, 24, 24) and train.images.dtype == torch.uint8
    assert sorted(train.labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert sorted(test.labels.tolist()) == [0] * 3 + [1] * 3, "cat 0, dog 1 in val as in train"
    red = train.images[train.labels == 0].float().mean(dim=(0, 2, 3))
    assert red[0] > 200 and red[1] < 60, f"class 0's images are red after decoding and resizing: {red}"


def test_image_folder_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="needs .*/train/<class>/<images> and .*/val/<class>/<images>"):
        load_data(folder_config(tmp_path, tmp_path / "nothing"))
    images = write_image_folder(tmp_path / "images")
    (images / "train" / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*0.png"):
        load_data(folder_config(tmp_path, images))
    train, _ = load_data(folder_config(tmp_path, images, stream=True, workers=1))
    with pytest.raises(UserError, match="cannot read image .*0.png") as err:
        list(train)  # raised in a worker process: still one line
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)

    cfg = load_config(write_yaml(tmp_path / "two.yaml", {"model": {"name": "tiny_cnn", "num_classes": 2},
                                                         "data": {"name": "imagefolder", "root": str(images)}}))
    (images / "train" / "cat" / "0.png").unlink()
    with pytest.raises(UserError, match="the data has 3 classes \\(cat, dog, eel\\) but the model has 2 outputs"):
        load_data(cfg)


def all_batches(batches, epoch):
    batches.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in batches]


def test_streaming_and_in_memory_paths_give_the_same_batches(tmp_path):
    images = write_image_folder(tmp_path / "images")
    memory = load_data(folder_config(tmp_path, images, train_subset=14, stream=False))
    stream = load_data(folder_config(tmp_path, images, train_subset=14, stream=True, workers=2))
    assert all(isinstance(b, Batches) for b in memory) and all(isinstance(b, StreamBatches) for b in stream)
    for split in (0, 1):
        for epoch in (0, 1):
            a, b = all_batches(memory[split], epoch), all_batches(stream[split], epoch)
            assert len(a) == len(b) == len(memory[split]) == (4 if split == 0 else 3)
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb), f"split {split} epoch {epoch}: the same batch"
        for rank in (0, 1):  # DDP: each rank's shard is the same on both paths
            a, b = all_batches(memory[split].shard(rank, 2), 1), all_batches(stream[split].shard(rank, 2), 1)
            assert all(torch.equal(ya, yb) and torch.equal(xa, xb) for (xa, ya), (xb, yb) in zip(a, b))
            assert memory[split].shard(rank, 2).num_images == stream[split].shard(rank, 2).num_images
    first = torch.cat([y for _, y in all_batches(memory[0], 0)])
    assert not torch.equal(first, torch.cat([y for _, y in all_batches(memory[0], 1)])), "shuffled per epoch"


def test_large_sets_stream_unless_told_otherwise(tmp_path, monkeypatch):
    images = write_image_folder(tmp_path / "images", per_class=2)
    monkeypatch.setattr(lrx.data.datasets, "STREAM_ABOVE_BYTES", 3 * 24 * 24 * 5)  # more than 5 images streams
    train, test = load_data(folder_config(tmp_path, images))
    assert isinstance(train, StreamBatches) and isinstance(test, Batches), "6 training images stream, 3 test not"
    train, _ = load_data(folder_config(tmp_path, images, stream=False))
    assert isinstance(train, Batches), "stream: false keeps them in memory"
    train, _ = load_data(folder_config(tmp_path, images, name="synthetic", train_subset=64, stream=None))
    assert isinstance(train, Batches), "a set read whole into memory stays there"


class TinyTrainSet(torch.utils.data.Dataset):
    """A stand-in for a torchvision dataset taking train=True/False (CIFAR100, MNIST, ...)."""

    classes = ["a", "b"]

    def __init__(self, root, train=True, download=False):
        self.train = train

    def __len__(self):
        return 6 if self.train else 4

    def __getitem__(self, i):
        return Image.new("L", (10, 12), color=40 * i), i % 2  # grayscale, not square


class TinySplitSet(TinyTrainSet):
    """One taking split= (SVHN, Food101, ...) and knowing "train" and "val" only."""

    def __init__(self, root, split="train", download=False):
        if split not in ("train", "val"):
            raise ValueError(f"Unknown value '{split}' for argument split")
        self.train = split == "train"


def test_torchvision_datasets_by_name(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "TinyTrainSet", TinyTrainSet, raising=False)
    monkeypatch.setattr(torchvision.datasets, "TinySplitSet", TinySplitSet, raising=False)
    for name in ("TinyTrainSet", "TinySplitSet"):
        train, test = load_data(folder_config(tmp_path, tmp_path, name=f"torchvision:{name}", image_size=8))
        assert train.images.shape == (6, 3, 8, 8) and test.images.shape == (4, 3, 8, 8), name
        assert train.labels.tolist() == [0, 1, 0, 1, 0, 1]
        assert torch.equal(train.images[2], torch.full((3, 8, 8), 80, dtype=torch.uint8)), "gray to RGB, resized"
    with pytest.raises(UserError, match="torchvision has no dataset 'NoSuchSet'"):
        load_data(folder_config(tmp_path, tmp_path, name="torchvision:NoSuchSet"))


def test_both_paths_train_to_the_same_weights(tmp_path, one_thread):
    """The same batches and the same dropout masks: the streaming loader must not draw from the global RNG."""

    weights = []
    for stream in (False, True):
        cfg = folder_config(tmp_path, tmp_path, name="synthetic", synthetic_size=16, image_size=16, train_subset=48,
                            test_subset=16, batch_size=16, stream=stream, workers=1 if stream else 0)
        train, test = load_data(cfg)
        assert isinstance(train, StreamBatches) == stream
        torch.manual_seed(0)
        model = build_model("tiny_cnn", 10)  # dropout in its head
        train_baseline(model, train, test, TrainConfig(epochs=2, optimizer="adamw", lr=3e-3), tmp_path / f"{stream}.ckpt",
                       quiet=True)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "streaming trains exactly as in memory"
