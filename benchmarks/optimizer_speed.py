"""AdamW's step on the seed's AlexNet: PyTorch's default (foreach) kernel against the fused one lrx uses.

    .venv/bin/python benchmarks/optimizer_speed.py [--threads 2] [--repeats 7]

Times ``optimizer.step()`` alone (gradients already in place) for all 57M parameters, the two
variants interleaved in one process; prints each median and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrx.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = {}
    for fused in (False, True):
        model = build_model("alexnet_cifar10")
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        variants["fused" if fused else "default"] = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                                                                      fused=fused or None)
    times = {name: [] for name in variants}
    for name, opt in variants.items():  # warm-up: allocates the moment buffers
        opt.step()
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            start = time.perf_counter()
            variants[name].step()
            times[name].append((time.perf_counter() - start) * 1000)
    n = sum(p.numel() for p in variants["default"].param_groups[0]["params"])
    print(f"AdamW step, {n / 1e6:.1f}M parameters, {args.threads} threads, median of {args.repeats}:")
    for name, runs in times.items():
        print(f"  {name:8s} {statistics.median(runs):7.1f} ms  (min {min(runs):.1f}, max {max(runs):.1f})")
    print(f"  fused is {statistics.median(times['default']) / statistics.median(times['fused']):.1f}x faster")


if __name__ == "__main__":
    main()
