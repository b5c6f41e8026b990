"""How far apart two profiles of the same model pair land: the old time column against the new one.

    .venv/bin/python benchmarks/profile_repeatability.py [--trials 5] [--batch 16] [--size 224] [--threads 2]

alexnet_cifar10 (random weights, seed 0) and scheme 2 on conv2-5 at row 11's ranks (23, 213, 160, 228),
profiled ``--trials`` times in this one process, as ``lrx profile`` would profile the run each time:

- old column: one ``torch.profiler`` forward of the expansion (``lrx.measure.profiling.profiler_times``, what the
  CPU time column was before it became a median);
- new column: ``profile_pair``'s ``cpu_time_ms`` (median of ``--repeats`` forwards interleaved with the
  original's layouts), and its speedup.

For each, the spread across trials: max / min. A column a reader can trust lands close to itself; the noisy
flag says when one trial's repeats spread too widely. Absolute times only hold on the machine that made them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.config.settings import ProfileConfig  # noqa: E402
from lrx.expansion.model import expand  # noqa: E402
from lrx.nn.models import build_model  # noqa: E402
from lrx.measure.profiling import profile_pair, profiler_times  # noqa: E402

RANKS = [23, 213, 160, 228]  # row 11: scheme 2, the 3x MAC plan


def spread(values: list[float], digits: int = 1) -> str:
    return (f"min {min(values):8.{digits}f}  median {statistics.median(values):8.{digits}f}  "
            f"max {max(values):8.{digits}f}  max/min {max(values) / min(values):5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    original = build_model("alexnet_cifar10").eval()
    expanded, report = expand(original, [2, 3, 4, 5], "v2", RANKS)
    names = [layer["name"] for layer in report.layers]
    cfg = ProfileConfig(input_size=[3, args.size, args.size], batch=args.batch, threads=args.threads,
                        warmup=args.warmup, repeats=args.repeats, device="cpu")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, 3x{args.size}x{args.size}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    old, new, speedups, noisy = [], [], [], 0
    for trial in range(args.trials):
        torch.set_num_threads(args.threads)
        old.append(profiler_times(expanded, args.batch, cfg.input_size, "cpu", args.warmup)["cpu_time_ms"])
        out = profile_pair(original, expanded, names, cfg, "cpu", per_layer=False, breakdown=False)
        new.append(out["cpu_time_ms"])
        speedups.append(out["latency"]["speedup"])
        noisy += bool(out["cpu_time"]["noisy"] or out["latency"]["noisy"])
        print(f"trial {trial + 1}: one profiler run {old[-1]:8.1f} ms | median {new[-1]:8.1f} ms "
              f"(p25-p75 {out['cpu_time']['p25_ms']:.1f}-{out['cpu_time']['p75_ms']:.1f}"
              f"{', noisy' if out['cpu_time']['noisy'] else ''}), speedup {speedups[-1]:.2f}x against "
              f"{out['latency']['original_layout']} ({out['latency']['speedup_default']:.2f}x against default)")
    print(f"old column (one torch.profiler run): {spread(old)}")
    print(f"new column (interleaved median):     {spread(new)}")
    print(f"speedup:                             {spread(speedups, 2)}")
    print(f"trials flagged noisy: {noisy} of {args.trials}")


if __name__ == "__main__":
    main()
