"""Write an image folder to compress a model on: Fashion-MNIST as RGB PNGs in torchvision's ImageFolder layout.

    python make_data.py --out images --train 2000 --val 500 --size 64

gives images/train/<class>/00000.png ... and images/val/<class>/...: a stand-in for your own photos.
The images come from Fashion-MNIST's training split (train/) and test split (val/), the first N of a
seeded shuffle, so every class appears in proportion; 28x28 grayscale, upscaled (bicubic) to --size
and stored as RGB. Reads the dataset with lrx's loader (data/, Debian's dataset-fashion-mnist, or a
download).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from lrx.data.datasets import load_split

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def write_split(images: torch.Tensor, labels: torch.Tensor, count: int, size: int, folder: Path, seed: int) -> None:
    """Write the first ``count`` images of a seeded shuffle of ``images`` uint8 (N, 3, 28, 28) as PNGs."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    for i in order.tolist():
        pixels = images[i].permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels, "RGB").resize((size, size), Image.BICUBIC)
        path = folder / CLASSES[int(labels[i])] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)  # no empty class folders: ImageFolder refuses them
        image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("images"), help="folder to write train/ and val/ into")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--size", type=int, default=64, help="side of the square PNGs, pixels")
    parser.add_argument("--data", type=Path, default=Path("data"), help="where to look for Fashion-MNIST first")
    args = parser.parse_args()
    if (args.out / "train").exists() or (args.out / "val").exists():
        parser.error(f"{args.out}/train or {args.out}/val exists already; remove it or choose another --out")
    for split, folder, count, seed in (("train", "train", args.train, 0), ("test", "val", args.val, 1)):
        images, labels = load_split("fashion-mnist", args.data, split)
        write_split(images, labels, min(count, len(labels)), args.size, args.out / folder, seed)
    print(f"wrote {args.train} training and {args.val} validation images ({args.size}x{args.size} PNG) "
          f"under {args.out}/")


if __name__ == "__main__":
    main()
