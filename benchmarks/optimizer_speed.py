"""AdamW's step on the seed's AlexNet: PyTorch's default (foreach) kernel against the fused one lrx uses.

    .venv/bin/python benchmarks/optimizer_speed.py [--threads 2] [--repeats 7]

Times ``optimizer.step()`` alone (gradients already in place) for all 44M parameters, the two
variants interleaved in one process (lrx.measure.profiling's rotation, as benchmarks/layer_speed.py); prints
each median and the ratio.
"""
from __future__ import annotations

import argparse

import torch

from lrx.nn.models import build_model
from lrx.measure.timing import interleaved


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
    # One warm-up step each (it allocates the moment buffers), then rounds in alternating order.
    stats = interleaved({name: opt.step for name, opt in variants.items()}, torch.device("cpu"), 1, args.repeats)
    n = sum(p.numel() for p in variants["default"].param_groups[0]["params"])
    print(f"AdamW step, {n / 1e6:.1f}M parameters, {args.threads} threads, median of {args.repeats}:")
    for name, s in stats.items():
        print(f"  {name:8s} {s['median_ms']:7.1f} ms  (min {s['min_ms']:.1f}, max {s['max_ms']:.1f})")
    print(f"  fused is {stats['fused']['speedup']:.1f}x faster")


if __name__ == "__main__":
    main()
