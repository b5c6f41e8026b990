"""Measured speed of the channel low-rank scheme on CPU: a linear layer and a 1x1 conv, dense against C -> R -> N.

    .venv/bin/python benchmarks/channel_speed.py [--batch 16] [--repeats 10] [--threads 2] [--channels-last]
    .venv/bin/python benchmarks/channel_speed.py --quick       # small shapes, 3 repeats: checks that it runs

Two layers at batch 16, random weights (speed does not depend on the values):

- ``nn.Linear(9216, 4096)`` (AlexNet's first classifier layer) on a (16, 9216) input, against
  :class:`lrx.nn.channel.LowRankChannel` at ranks 128, 256, 512, 1024;
- ``nn.Conv2d(256, 256, 1)`` on a (16, 256, 14, 14) input, against ranks 32, 64, 128.

Each table times the dense layer and every rank interleaved in one process (:func:`lrx.measure.timing.interleaved`:
each repeat times every variant once, in an order that rotates), under ``torch.inference_mode``. Rows read the
median, the speedup (the dense layer's median / the variant's), the MAC ratio (C N / R (C + N)) and the share of
the MAC ratio realised. Absolute milliseconds only hold on the machine that made them.
"""
from __future__ import annotations

import argparse
import os
import platform

import torch
from torch import nn

from lrx.factor.channel import channel_macs
from lrx.measure.timing import interleaved, torch_threads
from lrx.nn.channel import LowRankChannel

CPU = torch.device("cpu")
FULL = {"linear": (9216, 4096, (), (128, 256, 512, 1024)), "conv": (256, 256, (14, 14), (32, 64, 128))}
QUICK = {"linear": (576, 256, (), (32, 64)), "conv": (32, 32, (7, 7), (8, 16))}


def table(kind: str, c: int, n: int, spatial: tuple, ranks, batch: int, warmup: int, repeats: int,
          channels_last: bool) -> list[str]:
    """Markdown rows for one layer: dense, then each rank."""
    torch.manual_seed(0)
    dense = (nn.Conv2d(c, n, 1) if kind == "conv" else nn.Linear(c, n)).eval()
    x = torch.randn(batch, c, *spatial)
    if channels_last and kind == "conv":
        x = x.contiguous(memory_format=torch.channels_last)
        dense = dense.to(memory_format=torch.channels_last)
    variants = {"dense": dense}
    for rank in ranks:
        layer = LowRankChannel(c, n, rank, kind).eval()
        variants[f"rank {rank}"] = layer.to(memory_format=torch.channels_last) if channels_last else layer
    calls = {name: (lambda m=module: m(x)) for name, module in variants.items()}
    with torch.inference_mode():
        stats = interleaved(calls, CPU, warmup, repeats)
    positions = spatial[0] * spatial[1] if spatial else 1
    shape = f"{tuple(x.shape)}" + (", channels_last" if channels_last and kind == "conv" else "")
    rows = [f"\n## {'nn.Conv2d 1x1' if kind == 'conv' else 'nn.Linear'} {c} -> {n}, input {shape}\n",
            "| variant | median ms | speedup | MAC ratio | realised |", "|---|---|---|---|---|"]
    for name, s in stats.items():
        rank = None if name == "dense" else int(name.split()[1])
        ratio = channel_macs(c, n, None, positions) / channel_macs(c, n, rank, positions)
        speedup = s.get("speedup", 1.0)
        noisy = " ~" if s["noisy"] else ""
        rows.append(f"| {name} | {s['median_ms']:.3f}{noisy} | {speedup:.2f}x | {ratio:.2f} | {speedup / ratio:.0%} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="the conv's input and weights in NHWC")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats: check that it runs")
    args = parser.parse_args(argv)
    shapes, repeats = (QUICK, 3) if args.quick else (FULL, args.repeats)
    with torch_threads(args.threads) as threads:
        print(f"# lrx channel speed: batch {args.batch}, random weights{' (quick shapes)' if args.quick else ''}")
        print(f"torch {torch.__version__}, {threads} threads, {platform.processor() or 'unknown CPU'}, "
              f"{os.cpu_count()} CPUs, load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
              f"interleaved, median of {repeats} rounds after {args.warmup} warm-up")
        for kind, (c, n, spatial, ranks) in shapes.items():
            print("\n".join(table(kind, c, n, spatial, ranks, args.batch, args.warmup, repeats, args.channels_last)))
        print(f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
