"""Time of the data-aware fits (statistics + fit) on alexnet_cifar10 conv2-5.

    .venv/bin/python benchmarks/datafit_speed.py            # 512 synthetic 64x64 images, both schemes

Scheme 2 at ranks 23, 213, 160, 228 and scheme 1 (shared bases) at 8, 8, 6, 4, sequential fits with
at most 20 ALS sweeps (fewer once one gains under lrx.factor.datafit.TOL). Prints per scheme the seconds of
lrx.expand with fit="data" (split: statistics / the rest, mostly the fits) and per layer the sweeps run
and the relative output error of the filter fit and of the data fit on the calibration images.
Target: each scheme <= 60 s on the 2-core development machine, nothing else running. Random weights (no
checkpoint here): the errors show that the fit works, not what a trained network would reach.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from lrx.data.datasets import Batches, synthetic
from lrx.expansion.model import expand
from lrx.nn.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--sequential", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("alexnet_cifar10").eval()
    images, labels = synthetic(args.images, size=args.size)
    batches = Batches(images, labels, args.batch, args.size)
    print(f"# datafit speed: alexnet_cifar10 (random weights), conv2-5, {args.images} synthetic images "
          f"{args.size}x{args.size}, sequential={bool(args.sequential)}, {args.iterations} sweeps")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    total = 0.0
    for scheme, ranks in (("v2", [23, 213, 160, 228]), ("v1", [8, 8, 6, 4])):
        start = time.perf_counter()
        _, report = expand(model, [2, 3, 4, 5], scheme, ranks, fit="data", calibration=batches, images=args.images,
                                   sequential=bool(args.sequential), input_size=(3, args.size, args.size),
                                   iterations=args.iterations)
        seconds = time.perf_counter() - start
        total += seconds
        fit = report.fit_data
        print(f"\n{scheme} ranks {ranks}: {seconds:.1f} s (the data fit: statistics {fit['seconds_stats']:.1f} s, "
              f"fits and the rest {fit['seconds_fit']:.1f} s)")
        print("| layer | rank | sweeps | output error, filter fit | output error, data fit |\n|---|---|---|---|---|")
        for row in report.layers:
            print(f"| {row['name']} | {row['rank']} | {row['sweeps']} | {row['output_error_weights']:.4f} "
                  f"| {row['output_error']:.4f} |")
    print(f"\ntotal {total:.1f} s; load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
