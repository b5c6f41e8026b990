"""Write CIFAR-10-shaped files of synthetic images, for timing the seed's configs where CIFAR-10 cannot be fetched.

    python benchmarks/fake_cifar10.py DATA_ROOT        # then: lrx run configs/exp01.yaml --data-root DATA_ROOT

Writes DATA_ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch} in the python-pickle layout that
torchvision's CIFAR10 (and lrx's reader) expects: 50,000 + 10,000 images of 3x32x32, made by
:func:`lrx.data.datasets.synthetic` (a noisy coloured pattern per class). Epochs over them cost what CIFAR-10's
cost, so the timings hold; the accuracies are those of the synthetic task, not CIFAR-10's.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

from lrx.data.datasets import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    folder = args.root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic(50_000, 32, seed=0)
    test_x, test_y = synthetic(10_000, 32, seed=1)
    batches = [(f"data_batch_{i + 1}", train_x[i * 10_000:(i + 1) * 10_000], train_y[i * 10_000:(i + 1) * 10_000])
               for i in range(5)] + [("test_batch", test_x, test_y)]
    for name, x, y in batches:
        entry = {"data": x.reshape(len(x), -1).numpy(), "labels": y.tolist(), "batch_label": name}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    print(f"wrote {folder}: 50000 train + 10000 test synthetic images (CIFAR-10 layout)")


if __name__ == "__main__":
    main()
