"""Datasets as uint8 images, batched, resized and normalised on the device that trains.

Two paths give the same batches for the same seed (same order, same shards, same pixels):

- in memory (:class:`Batches`): the split is held as ``(images uint8 (N, 3, H, W), labels int64 (N,))``,
  shuffled with ``torch.randperm``, sliced into batches that are converted, resized and normalised as
  whole tensors (no per-image Python work in the loop, as in airbench). The default for sets that fit.
- streaming (:class:`StreamBatches`): a ``DataLoader`` with worker processes and pinned memory reads the
  same images batch by batch, for sets too big for memory (``data.stream: true``, or automatically
  above :data:`STREAM_ABOVE_BYTES`).

Sources: ``cifar10``, ``fashion-mnist`` and ``synthetic`` (read whole into memory); ``imagefolder``
(torchvision's ImageFolder layout, ``<root>/train/<class>/*.png`` and ``<root>/val/<class>/...``, or ``val/`` and
``test/`` both) and
``torchvision:<Dataset>`` (any torchvision classification dataset, downloaded where it can be), whose images
are decoded one by one into uint8 at ``data.image_size`` (shorter side resized, centre crop). Image folders are
listed and read by :mod:`lrx.data.folders`; :func:`check_data` checks one before a run starts. The validation
split that ``select_on: validation`` chooses epochs on is held out of the training split (:mod:`lrx.data.splits`).
Any other iterable of (images, labels) batches (a ``DataLoader``, a list) goes through :func:`as_batches`.
The module is long because it holds both paths and every source, which share one order and one decode.
"""
from __future__ import annotations

import functools
import gzip
import inspect
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.v2 import functional as TF

from lrx.base.errors import UserError
from lrx.data.folders import check_image, find_classes, index_folder, read_image
from lrx.data.splits import TRAIN_SIZES, VAL_SEED_OFFSET, carve, check_split_sizes

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DATASETS", "STREAM_ABOVE_BYTES", "DEBIAN_FASHION_MNIST", "Batches",
           "StreamBatches", "Loader", "as_batches", "length", "synthetic", "data_root", "load_split",
           "FASHION_FILES", "subset_indices", "subset", "square_uint8", "to_uint8", "FolderImages",
           "TorchvisionImages", "TensorImages", "held_out_folders", "image_folder", "SPLIT_NAMES", "torchvision_split",
           "source", "in_memory", "check_classes", "streams", "Splits", "data_splits", "load_splits", "load_data",
           "check_data"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("cifar10", "fashion-mnist", "synthetic", "imagefolder", "torchvision:<Dataset>")
# Above this many bytes of uint8 images (at data.image_size) a decoded source streams instead of being held
# in memory, unless data.stream says otherwise.
STREAM_ABOVE_BYTES = 4 * 2**30
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class _Order:
    """What both paths share: the seeded order of an epoch, the shards, the batch count, the normalisation.

    Parameters
    ----------
    count : images in the split
    batch_size : images per batch
    image_size : side of the square images fed to the model (bilinear resize per batch where needed)
    device : where batches are prepared and returned
    shuffle : reshuffle each epoch (deterministic in ``seed`` and the epoch set by :meth:`set_epoch`)
    """

    def __init__(self, count, batch_size, image_size, device="cpu", shuffle=False, seed=0, drop_last=False):
        self.count = count
        self.batch_size, self.image_size = batch_size, image_size
        self.device = torch.device(device)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self._rank, self._world = 0, 1
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def num_images(self) -> int:
        return len(self._indices_of_shard(torch.arange(self.count)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world: int):
        """This rank's share of every epoch (as DistributedSampler: same permutation, strided)."""
        other = self._copy()
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
            order = torch.randperm(self.count, generator=gen)
        else:
            order = torch.arange(self.count)
        return self._indices_of_shard(order)

    def __len__(self) -> int:
        n = self.num_images
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (B, 3, S, S), resized and normalised with ImageNet mean/std."""
        x = batch.float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=False)
        return (x - self._mean) / self._std


class Batches(_Order):
    """Batches of one split held in memory, prepared on ``device``.

    Parameters
    ----------
    images : uint8 tensor (N, 3, H, W)
    labels : int64 tensor (N,)
    the rest : see :class:`_Order`.
    """

    def __init__(self, images, labels, batch_size, image_size, device="cpu", shuffle=False, seed=0, drop_last=False):
        super().__init__(len(labels), batch_size, image_size, device, shuffle, seed, drop_last)
        self.images, self.labels = images, labels
        self._on_device = None  # the uint8 images moved to the device once

    def _copy(self) -> "Batches":
        return Batches(self.images, self.labels, self.batch_size, self.image_size, self.device,
                       self.shuffle, self.seed, self.drop_last)

    def __iter__(self):
        if self._on_device is None:
            self._on_device = (self.images.to(self.device), self.labels.to(self.device))
        images, labels = self._on_device
        order = self._order().to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.prepare(images[idx]), labels[idx]


class StreamBatches(_Order):
    """Batches of one split read by a ``DataLoader`` (``workers`` processes, pinned memory on a GPU).

    The same order, shards and preparation as :class:`Batches` over the same images.

    Parameters
    ----------
    dataset : map-style dataset of ``(uint8 (3, H, W), int label)``, every image of one size
    workers : DataLoader worker processes (0: read in this process)
    the rest : see :class:`_Order`.
    """

    def __init__(self, dataset, batch_size, image_size, device="cpu", shuffle=False, seed=0, drop_last=False,
                 workers: int = 2):
        super().__init__(len(dataset), batch_size, image_size, device, shuffle, seed, drop_last)
        self.dataset, self.workers = dataset, workers

    def _copy(self) -> "StreamBatches":
        return StreamBatches(self.dataset, self.batch_size, self.image_size, self.device, self.shuffle, self.seed,
                             self.drop_last, self.workers)

    def __iter__(self):
        order = self._order()
        chunks = [order[i * self.batch_size : (i + 1) * self.batch_size].tolist() for i in range(len(self))]
        # Its own generator: the loader's worker seed must not draw from the global RNG, whose next draws
        # are the training's dropout masks (else the two paths would train differently on the same batches).
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        loader = DataLoader(self.dataset, batch_sampler=chunks, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=gen)
        for images, labels in _read(loader):
            yield (self.prepare(images.to(self.device, non_blocking=True)),
                   labels.to(self.device, dtype=torch.int64, non_blocking=True))


def _read(loader: DataLoader):
    """The batches of ``loader``; a UserError raised in a worker process comes back as its own one line
    (DataLoader re-raises it with the worker's traceback in its message)."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UserError as err:
            if not str(err).startswith("Caught UserError"):
                raise
            message = str(err).strip().splitlines()[-1].split("UserError: ", 1)[-1]
            # The traceback holds the loader's iterator in a reference cycle; freed by the garbage collector
            # later, its workers take 5 s each to stop. Dropped here, they stop with `del batches`.
            err.__traceback__ = None
        else:
            yield batch
            continue
        del batches
        raise UserError(message)


class Loader:
    """Any iterable of ``(images, labels)`` batches (a ``DataLoader``, a list) as lrx's loops use batches.

    Each batch is moved to ``device``; :meth:`set_epoch` reaches a ``DistributedSampler``'s; under DDP the
    iterable is taken to be this process's share already (:meth:`shard` returns it unchanged), and
    ``num_images`` is None (metrics count the images each process sees). Iterate-again iterables only:
    every epoch iterates it once more.
    """

    num_images = None

    def __init__(self, batches, device="cpu"):
        if iter(batches) is batches:  # a generator or iterator: the second epoch would find it empty
            raise UserError(f"batches must be iterable again, every epoch (a list, a DataLoader); got a one-shot "
                            f"{type(batches).__name__}", key="data")
        self.batches, self.device = batches, torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        for owner in (self.batches, getattr(self.batches, "sampler", None), getattr(self.batches, "batch_sampler", None)):
            if owner is not None and hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
                return

    def shard(self, rank: int, world: int) -> "Loader":
        return self

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise UserError(f"a batch must be (images, labels), got {type(batch).__name__}", key="data")
            x, y = batch[0], batch[1]
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def as_batches(batches, device="cpu"):
    """``batches`` itself when it is lrx's (:class:`Batches`, :class:`StreamBatches`, :class:`Loader`),
    else a :class:`Loader` over it that moves each batch to ``device``."""
    return batches if isinstance(batches, (_Order, Loader)) else Loader(batches, device)


def length(batches) -> int | None:
    """The number of batches per pass, or None when the iterable does not say."""
    try:
        return len(batches)
    except TypeError:
        return None


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
        n = TRAIN_SIZES["synthetic"] if split == "train" else 500
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


def subset_indices(count: int, n: int | None, seed: int) -> torch.Tensor | None:
    """The positions of a fixed, seeded subset of ``n`` of ``count`` images; None for all of them."""
    if n is None or n >= count:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n]


def subset(images, labels, n: int | None, seed: int):
    """A fixed, seeded subset of ``n`` images (all of them when n is None or too large)."""
    idx = subset_indices(len(labels), n, seed)
    return (images, labels) if idx is None else (images[idx], labels[idx])


# ---------------------------------------------------------------- decoded sources


def square_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (3, size, size): shorter side resized to ``size`` (antialiased), centre crop;
    grayscale repeated to 3 channels, alpha dropped."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = image[:3]
    if min(image.shape[-2:]) != size:
        image = TF.resize(image, [size], antialias=True)
    if tuple(image.shape[-2:]) != (size, size):
        image = TF.center_crop(image, [size, size])
    return image.contiguous()


def to_uint8(image) -> torch.Tensor:
    """A PIL image or an image tensor (uint8 or float in [0, 1], (C, H, W) or (H, W)) as uint8 (C, H, W)."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if isinstance(image, torch.Tensor):
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dtype != torch.uint8:
            image = (image.float() * 255).round().clamp(0, 255).to(torch.uint8)
        return image
    raise UserError(f"the dataset gives images of type {type(image).__name__}; expected a PIL image or a tensor",
                    key="data.name")


class FolderImages(Dataset):
    """One split of an image folder (torchvision's ImageFolder layout) as ``(uint8 (3, size, size), label)``.

    ``class_to_idx``: the training split's classes, so that a validation folder with fewer classes keeps
    the training labels. The folder is indexed by :func:`lrx.data.folders.index_folder` (symlinked folders
    that would change labels refused, files that are not regular files skipped: ``skipped``).
    """

    def __init__(self, folder: Path, size: int, class_to_idx: dict[str, int] | None = None):
        found = index_folder(folder)
        self.class_to_idx = class_to_idx or {name: i for i, name in enumerate(found.classes)}
        self.classes = list(self.class_to_idx)  # the training split's, for both splits
        unknown = sorted(set(found.classes) - set(self.class_to_idx))
        if unknown:
            raise UserError(f"{folder} has classes the training folder lacks: {', '.join(unknown[:10])}; "
                            f"training classes: {', '.join(list(self.class_to_idx)[:10])}", key="data.root")
        self.samples = [(path, self.class_to_idx[name]) for path, name in found.samples]
        self.folder, self.skipped = Path(folder), found.skipped
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return square_uint8(TF.pil_to_tensor(read_image(path)), self.size), label


class TorchvisionImages(Dataset):
    """A torchvision classification dataset's split as ``(uint8 (3, size, size), label)``."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, size
        self.classes = list(getattr(dataset, "classes", []) or [])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i][:2]
        return square_uint8(to_uint8(image), self.size), int(label)


class TensorImages(Dataset):
    """In-memory ``(images uint8 (N, 3, H, W), labels)`` as a dataset (to stream them as any other source)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def held_out_folders(root: Path) -> tuple[Path | None, Path | None]:
    """(validation folder, test folder) of the image folder at ``root``: ``val/`` and ``test/`` when it has
    both; else (None, whichever of them it has), the validation images then held out of ``train/``."""
    found = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if len(found) == 2:
        return found[0], found[1]
    return None, (found[0] if found else None)


def image_folder(root: Path, size: int, split: str) -> FolderImages:
    """Split ``split`` of an image folder at ``root``: ``train/``; for "test" ``test/`` (else ``val/``); for
    "val" ``val/`` of a folder that has ``test/`` too (:func:`held_out_folders`); labelled by the training
    folder's classes."""
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist{'' if root.is_absolute() else f' (in {Path.cwd()})'}; "
                        f"data.name imagefolder needs {root}/train/<class>/<images> and {root}/val/<class>/<images>",
                        key="data.root")
    val, test = held_out_folders(root)
    if not (root / "train").is_dir() or test is None:
        raise UserError(f"data.name imagefolder needs {root}/train/<class>/<images> and {root}/val/<class>/<images> "
                        "(torchvision's ImageFolder layout); set data.root (or --data-root) to that folder",
                        key="data.root")
    folder = {"train": root / "train", "test": test, "val": val}[split]
    if folder is None:
        raise UserError(f"{root} has no val/ folder beside test/: its validation images come from train/",
                        key="data.root")
    class_to_idx = {name: i for i, name in enumerate(find_classes(root / "train"))}
    return FolderImages(folder, size, class_to_idx)


SPLIT_NAMES = {"train": ("train", "trainval"), "test": ("test", "val")}


def torchvision_split(name: str, root: Path, split: str, download: bool):
    """Split ``split`` ("train" or "test") of ``torchvision.datasets.<name>``, downloaded into ``root`` if allowed.

    Datasets take ``train=True/False`` (CIFAR100, MNIST, ...) or ``split=`` (SVHN, Food101, ...); a dataset
    with neither gives the same images for both splits.
    """
    cls = getattr(torchvision.datasets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise UserError(f"torchvision has no dataset {name!r}; e.g. torchvision:CIFAR100, torchvision:MNIST, "
                        "torchvision:SVHN, torchvision:Food101 (names as in torchvision.datasets)", key="data.name")
    params = inspect.signature(cls).parameters
    kwargs = {"download": download} if "download" in params else {}
    if "train" in params:
        choices = [{"train": split == "train"}]
    elif "split" in params:
        choices = [{"split": option} for option in SPLIT_NAMES[split]]
    else:
        choices = [{}]
    errors = []
    for choice in choices:
        try:
            return cls(str(root), **choice, **kwargs)
        except ValueError as err:  # a split name this dataset does not know: try the next
            errors.append(str(err))
        except Exception as err:  # network, missing files, a dataset that needs other arguments
            raise UserError(f"cannot load torchvision dataset {name} into {root} ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:300]}); download: {download}", key="data.name") from None
    raise UserError(f"torchvision dataset {name} has no {split} split ({'; '.join(errors)[:300]})", key="data.name")


def source(d, root: Path, split: str, num_classes: int) -> Dataset:
    """One split of the config's data (``d``: :class:`lrx.config.settings.DataConfig`) as a dataset of uint8 images."""
    if d.name == "imagefolder":
        return image_folder(root, d.image_size, split)
    if d.name.startswith("torchvision:"):
        return TorchvisionImages(torchvision_split(d.name.split(":", 1)[1], root, split, d.download), d.image_size)
    return TensorImages(*load_split(d.name, root, split, d.download, d.synthetic_size, num_classes))


def in_memory(dataset: Dataset, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``dataset`` as (images uint8 (N, 3, H, W), labels int64 (N,)), decoded by ``workers``."""
    if isinstance(dataset, TensorImages):
        return dataset.images, dataset.labels
    if len(dataset) == 0:
        raise UserError("the dataset has no images", key="data.root")
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, generator=torch.Generator().manual_seed(0))
    images, labels = zip(*_read(loader))
    return torch.cat(images), torch.cat(labels).to(torch.int64)


def check_classes(dataset: Dataset, num_classes: int) -> None:
    """Refuse a dataset with more classes than the model's outputs."""
    classes = getattr(dataset, "classes", None) or []
    if len(classes) > num_classes:
        shown = ", ".join(map(str, classes[:8])) + (", ..." if len(classes) > 8 else "")
        raise UserError(f"the data has {len(classes)} classes ({shown}) but the model has {num_classes} outputs; "
                        f"set model.num_classes: {len(classes)}", key="model.num_classes")


def streams(d, dataset: Dataset) -> bool:
    """Whether the split streams: ``data.stream`` when set, else when its decoded images exceed
    :data:`STREAM_ABOVE_BYTES` (a set read whole into memory already, like cifar10, stays there)."""
    if d.stream is not None:
        return d.stream
    if isinstance(dataset, TensorImages):
        return False
    return len(dataset) * 3 * d.image_size ** 2 > STREAM_ABOVE_BYTES


def _take(dataset: Dataset, idx: torch.Tensor | None) -> Dataset:
    """The images of ``dataset`` at positions ``idx`` (all of them when None), in that order."""
    if idx is None:
        return dataset
    if isinstance(dataset, TensorImages):
        return TensorImages(dataset.images[idx], dataset.labels[idx])
    return Subset(dataset, idx.tolist())


class Splits(NamedTuple):
    """A config's three splits (datasets, or batches of them): the images trained on, the validation images
    that choose the kept epoch (None with ``select_on: test``), the test images acc@1 is reported on."""

    train: object
    val: object
    test: object


def data_splits(cfg, root: Path) -> Splits:
    """A config's data as it is read: :func:`source`'s splits, their classes checked against the model's
    outputs, cut to ``data.test_subset`` (seed + 1), and the validation split held out of the training split
    before ``data.train_subset`` (seeded) is drawn from the rest (:func:`lrx.data.splits.carve`); an image
    folder with ``val/`` and ``test/`` validates on ``val/`` (``data.val_subset`` of it, seed + 2)."""
    d = cfg.data
    train = source(d, root, "train", cfg.model.num_classes)
    check_classes(train, cfg.model.num_classes)
    test = source(d, root, "test", cfg.model.num_classes)
    check_classes(test, cfg.model.num_classes)
    test = _take(test, subset_indices(len(test), d.test_subset, cfg.seed + 1))
    if cfg.select_on == "test":
        return Splits(_take(train, subset_indices(len(train), d.train_subset, cfg.seed)), None, test)
    if d.name == "imagefolder" and held_out_folders(root)[0] is not None:
        if d.val_fraction is not None:
            raise UserError(f"{root} validates on its val/ folder; data.val_fraction carves validation images out "
                            "of train/ only when there is no val/ beside test/ (data.val_subset takes some of val/)",
                            key="data.val_fraction")
        val = image_folder(root, d.image_size, "val")
        val = _take(val, subset_indices(len(val), d.val_subset, cfg.seed + VAL_SEED_OFFSET))
        return Splits(_take(train, subset_indices(len(train), d.train_subset, cfg.seed)), val, test)
    train_idx, val_idx = carve(len(train), d, cfg.seed, f"the training split of {d.name}")
    return Splits(_take(train, train_idx), _take(train, val_idx), test)


def load_splits(cfg, device="cpu", root_override: str | None = None) -> Splits:
    """Batches of a config's three splits (:func:`data_splits`): :class:`Batches`, or :class:`StreamBatches`
    where :func:`streams` says so; the training batches shuffle, the others keep their order."""
    d = cfg.data
    out = []
    for name, dataset in zip(Splits._fields, data_splits(cfg, data_root(d.root, root_override))):
        train = name == "train"
        batch_size = d.batch_size if train else d.test_batch_size
        if dataset is None:
            out.append(None)
        elif streams(d, dataset):
            out.append(StreamBatches(dataset, batch_size, d.image_size, device, train, cfg.seed, workers=d.workers))
        else:
            out.append(Batches(*in_memory(dataset, d.workers), batch_size, d.image_size, device, train, cfg.seed))
    return Splits(*out)


def load_data(cfg, device="cpu", root_override: str | None = None):
    """(train, test) batches of a config (:func:`load_splits` without the validation split)."""
    splits = load_splits(cfg, device, root_override)
    return splits.train, splits.test


def check_data(cfg, root_override: str | None = None) -> list[str]:
    """Check a config's data before a run starts, without decoding a pixel: the validation split's size
    against the training split where that is known unread (:data:`lrx.data.splits.TRAIN_SIZES`); an image
    folder's folders and classes (:func:`image_folder`), the classes against the model's outputs, its splits
    (:func:`data_splits`) and every image a run reads opened and verified (:func:`lrx.data.folders.check_image`,
    about 50 us a file). A ``torchvision:`` set's sizes are checked when the run reads it.

    Returns notes for the user (files skipped); raises UserError naming the config file.
    """
    d = cfg.data
    if d.name != "imagefolder":
        if cfg.select_on == "validation" and d.name in TRAIN_SIZES:
            try:
                check_split_sizes(d, TRAIN_SIZES[d.name], f"the training split of {d.name}")
            except UserError as err:
                raise UserError(err.message, file=cfg.path, key=err.key) from None
        return []
    root = data_root(d.root, root_override)
    given = "--data-root" if root_override else "the env var LRX_DATA" if os.environ.get("LRX_DATA") else None
    notes = []
    try:
        for dataset in data_splits(cfg, root):
            if dataset is None:
                continue
            folder, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
            for i in range(len(folder)) if indices is None else indices:
                check_image(folder.samples[i][0])
            if folder.skipped:
                count = len(folder.skipped)
                notes.append(f"{folder.folder}: skipped {count} file{'s' * (count > 1)} with an image extension that "
                             f"{'are' if count > 1 else 'is'} not a regular file (FIFO, socket, device, broken link): "
                             f"{', '.join(folder.skipped[:3])}{', ...' * (count > 3)}")
    except UserError as err:
        where = f" (data root from {given})" if given and (err.key or "data.root") == "data.root" else ""
        raise UserError(err.message + where, file=cfg.path, key=err.key or "data.root") from None
    return list(dict.fromkeys(notes))
