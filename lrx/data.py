"""Datasets as uint8 tensors, batched, resized and normalised on the device that trains.

Every dataset is loaded once into memory as ``(images uint8 (N, 3, H, W), labels int64 (N,))``;
:class:`Batches` shuffles with ``torch.randperm``, slices batches, and converts, resizes and
normalises whole batches as tensors (no per-image Python work in the loop, as in airbench).
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("cifar10", "fashion-mnist", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class Batches:
    """Batches of one split, prepared on ``device``.

    Parameters
    ----------
    images : uint8 tensor (N, 3, H, W)
    labels : int64 tensor (N,)
    batch_size : images per batch
    image_size : side of the square images fed to the model (bilinear resize per batch)
    device : where batches are prepared and returned
    shuffle : reshuffle each epoch (deterministic in ``seed`` and the epoch set by :meth:`set_epoch`)
    """

    def __init__(self, images, labels, batch_size, image_size, device="cpu", shuffle=False, seed=0, drop_last=False):
        self.images, self.labels = images, labels
        self.batch_size, self.image_size = batch_size, image_size
        self.device = torch.device(device)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self._rank, self._world = 0, 1
        self._on_device = None  # the uint8 images moved to the device once
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def num_images(self) -> int:
        return len(self._indices_of_shard(torch.arange(len(self.labels))))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world: int) -> "Batches":
        """This rank's share of every epoch (as DistributedSampler: same permutation, strided)."""
        other = Batches(self.images, self.labels, self.batch_size, self.image_size, self.device,
                        self.shuffle, self.seed, self.drop_last)
        other._rank, other._world = rank, world
        return other

    def _indices_of_shard(self, order: torch.Tensor) -> torch.Tensor:
        if self._world == 1:
            return order
        per_rank = -(-len(order) // self._world)
        padded = torch.cat([order, order[: per_rank * self._world - len(order)]])
        return padded[self._rank :: self._world]

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.labels), generator=gen)
        else:
            order = torch.arange(len(self.labels))
        return self._indices_of_shard(order)

    def __len__(self) -> int:
        n = self.num_images
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if self._on_device is None:
            self._on_device = (self.images.to(self.device), self.labels.to(self.device))
        images, labels = self._on_device
        order = self._order().to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.prepare(images[idx]), labels[idx]

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (B, 3, S, S), resized and normalised with ImageNet mean/std."""
        x = batch.float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=False)
        return (x - self._mean) / self._std


# ---------------------------------------------------------------- datasets


def synthetic(n: int, size: int = 32, num_classes: int = 10, seed: int = 0):
    """Small, deterministic, learnable images: each class is a noisy coloured pattern of its own.

    Returns (images uint8 (n, 3, size, size), labels int64 (n,)).
    """
    gen = torch.Generator().manual_seed(1234)  # class prototypes are the same for every split
    protos = torch.rand(num_classes, 3, 4, 4, generator=gen)
    protos = F.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    noise = torch.rand(n, 3, size, size, generator=gen)
    images = 0.7 * protos[labels] + 0.3 * noise
    return (images * 255).round().clamp(0, 255).to(torch.uint8), labels


def data_root(configured: str, override: str | None = None) -> Path:
    """The data root: ``--data-root``, else the env var ``LRX_DATA``, else the config's ``data.root``."""
    return Path(override or os.environ.get("LRX_DATA") or configured)


@functools.lru_cache(maxsize=4)
def load_split(name: str, root: Path, split: str, download: bool = True, synthetic_size: int = 32, num_classes: int = 10):
    """One split ("train" or "test") of a dataset as (images uint8 (N, 3, H, W), labels int64 (N,)).

    Cached, so the runs of one process (``lrx run a.yaml b.yaml ...``) read each split once.
    """
    if name == "synthetic":
        n = 2000 if split == "train" else 500
        return synthetic(n, synthetic_size, num_classes, seed=0 if split == "train" else 1)
    if name == "cifar10":
        return _cifar10(Path(root), split, download)
    if name == "fashion-mnist":
        return _fashion_mnist(Path(root), split, download)
    raise UserError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}", key="data.name")


def _cifar10(root: Path, split: str, download: bool):
    folder = root / "cifar-10-batches-py"
    if not folder.exists():
        if not download:
            raise UserError(f"CIFAR-10 is missing: expected {folder} (torchvision's CIFAR10 layout); "
                            "download is off (data.download: false)", key="data.root")
        try:
            torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
        except Exception as err:  # no network: tell the user where to put the files
            raise UserError(
                f"CIFAR-10 is missing and could not be downloaded ({type(err).__name__}); put cifar-10-python.tar.gz's "
                f"folder cifar-10-batches-py under {root} (or set --data-root / LRX_DATA)", key="data.root") from None
    # Read the pickled batches directly: the same files torchvision's CIFAR10 reads, without PIL per image.
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for file in files:
        path = folder / file
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError) as err:
            raise UserError(f"cannot read CIFAR-10 file {path}: {err}", key="data.root") from None
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _fashion_mnist(root: Path, split: str, download: bool):
    folders = [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, DEBIAN_FASHION_MNIST]
    image_file, label_file = FASHION_FILES[split]
    for folder in folders:
        images, labels = _find_idx(folder, image_file), _find_idx(folder, label_file)
        if images and labels:
            x = torch.from_numpy(_read_idx(images)).unsqueeze(1).repeat(1, 3, 1, 1)  # grayscale -> 3 channels
            return x.contiguous(), torch.from_numpy(_read_idx(labels)).to(torch.int64)
    if download:
        try:
            torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
        except Exception as err:
            raise UserError(
                f"Fashion-MNIST is missing and could not be downloaded ({type(err).__name__}); install Debian's "
                f"dataset-fashion-mnist (files in {DEBIAN_FASHION_MNIST}) or put the four idx files under {root}",
                key="data.root") from None
        return _fashion_mnist(root, split, download=False)
    raise UserError(f"Fashion-MNIST is missing: looked for {image_file}[.gz] in {', '.join(map(str, folders))}",
                    key="data.root")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read {path}: {err}", key="data.root") from None
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}", key="data.root")
    return array.reshape(shape).copy()


def subset(images, labels, n: int | None, seed: int):
    """A fixed, seeded subset of ``n`` images (all of them when n is None or too large)."""
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def load_data(cfg, device="cpu", root_override: str | None = None):
    """Train and test :class:`Batches` for a config (``lrx.config.Config``)."""
    d = cfg.data
    root = data_root(d.root, root_override)
    train = load_split(d.name, root, "train", d.download, d.synthetic_size, cfg.model.num_classes)
    test = load_split(d.name, root, "test", d.download, d.synthetic_size, cfg.model.num_classes)
    train = subset(*train, d.train_subset, cfg.seed)
    test = subset(*test, d.test_subset, cfg.seed + 1)
    return (
        Batches(*train, d.batch_size, d.image_size, device, shuffle=True, seed=cfg.seed),
        Batches(*test, d.test_batch_size, d.image_size, device, shuffle=False, seed=cfg.seed),
    )
