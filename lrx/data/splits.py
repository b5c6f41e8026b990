"""The validation split: which training images are held out to choose the kept epoch (``select_on: validation``).

The validation images are drawn first, seeded by the config's seed, from the whole training split; the
training images (all the others, or ``data.train_subset`` of them) come from what is left, so the two never
share an image. Their number is ``data.val_subset``, else ``data.val_fraction`` of the training split, else
:data:`DEFAULT_FRACTION` of it, at most :data:`DEFAULT_MAX` images (5,000 of CIFAR-10's 50,000 and of
Fashion-MNIST's 60,000). An image folder with ``train/``, ``val/`` and ``test/`` validates on ``val/``
instead (:func:`lrx.data.datasets.image_folder`); nothing is carved from its ``train/`` then.

:func:`check_split_sizes` refuses sizes that cannot be met (more validation images than training images,
validation and ``train_subset`` together more than the split holds) in one line; the sources whose size is
known without reading them (:data:`TRAIN_SIZES`) and image folders are checked before a run starts.
"""
from __future__ import annotations

import torch

from lrx.base.errors import UserError

__all__ = ["DEFAULT_FRACTION", "DEFAULT_MAX", "TRAIN_SIZES", "VAL_SEED_OFFSET", "validation_count",
           "check_split_sizes", "carve"]

DEFAULT_FRACTION = 0.1  # of the training split, when neither data.val_subset nor data.val_fraction is set
DEFAULT_MAX = 5000  # images: the default's cap (a validation accuracy to about +-0.6 points at 95%)
# Training images of the built-in sources, known before they are read (the synthetic set's is lrx's own).
TRAIN_SIZES = {"cifar10": 50_000, "fashion-mnist": 60_000, "synthetic": 2000}
# A val/ folder's data.val_subset is drawn with seed + this (the training subset uses the seed, the test
# subset seed + 1).
VAL_SEED_OFFSET = 2


def _key(d) -> str:
    """The key a message about the validation split's size names."""
    return "data.val_fraction" if d.val_fraction is not None else "data.val_subset"


def validation_count(d, n_train: int) -> int:
    """How many of ``n_train`` training images the validation split takes (``d``: the config's ``data``)."""
    if d.val_subset is not None:
        return d.val_subset
    fraction = d.val_fraction if d.val_fraction is not None else DEFAULT_FRACTION
    count = round(fraction * n_train)
    if d.val_fraction is None:
        count = min(count, DEFAULT_MAX)
    return max(count, 1)


def check_split_sizes(d, n_train: int, what: str = "the training split") -> int:
    """Refuse validation sizes ``n_train`` training images cannot meet; returns the validation count.

    ``what`` names the training images in the message (``the training split of fashion-mnist``).
    """
    count = validation_count(d, n_train)
    given = (f"data.val_subset: {d.val_subset}" if d.val_subset is not None else
             f"data.val_fraction: {d.val_fraction}" if d.val_fraction is not None else
             f"the default {DEFAULT_FRACTION:.0%}, at most {DEFAULT_MAX}")
    if count >= n_train:
        raise UserError(f"a validation split of {count} images ({given}) leaves none of the {n_train} images of "
                        f"{what} to train on; hold out fewer (at most {n_train - 1}) or set select_on: test",
                        key=_key(d))
    if d.train_subset is not None and d.train_subset + count > n_train:
        raise UserError(f"data.train_subset {d.train_subset} and {count} validation images ({given}) overlap: "
                        f"{what} has {n_train} images; set train_subset to at most {n_train - count} or hold out "
                        "fewer validation images", key="data.train_subset")
    return count


def carve(n_train: int, d, seed: int, what: str = "the training split") -> tuple[torch.Tensor, torch.Tensor]:
    """(training positions, validation positions) among ``n_train`` images: disjoint, seeded by ``seed``.

    One seeded permutation: its first :func:`validation_count` positions validate, the next
    ``d.train_subset`` (all the rest when null) train.
    """
    count = check_split_sizes(d, n_train, what)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    rest = order[count:] if d.train_subset is None else order[count: count + d.train_subset]
    return rest, order[:count]
