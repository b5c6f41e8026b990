"""Where a network's CPU time goes, by what lrx can replace: the ceiling of any low-rank plan of it.

    .venv/bin/python benchmarks/time_shares.py [--models mobilenet_v2 resnet50] [--batch 16] [--size 224]
        [--threads 2] [--out results/cpu/time-shares.md]

For each torchvision model (random weights, seed 0: time does not depend on the values), the original is
prepared as the latency planner times it (channels_last, :class:`lrx.plan.latency.DeviceTiming`) and timed per
module (:func:`lrx.measure.timing.module_times`: forward hooks on every leaf, medians over repeats of at least
0.5 s). Each module's time is put in one group: KxK convs scheme 2 replaces, 1x1 convs and linear layers the
channel scheme replaces, depthwise and other grouped convs (which no lrx scheme replaces), and the rest
(batch norm, activations, pooling, additions, and time outside any module). If every replaceable layer took
no time at all, the model would run at most ``total / (total - replaceable)`` times faster: no plan of lrx's
schemes can beat that ceiling, and a real one (each layer at its fastest rank) stays below it. lrx times
models as they are, batch norm as its own module in the original and the expansion alike; the second ceiling
is the one if batch norm were folded into the convs before them in both (its time gone). Run it on an idle
machine.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lrx  # noqa: E402
from lrx.measure.machine import MachineWatch, cpu_name  # noqa: E402
from lrx.measure.timing import module_times, torch_threads  # noqa: E402
from lrx.plan.latency import DeviceTiming  # noqa: E402
from seed_spread import commit  # noqa: E402

GROUPS = ("KxK convs (scheme 2)", "1x1 convs and linear (channel scheme)", "depthwise and grouped convs (none)",
          "batch norm", "the rest (activations, pooling, adds, outside modules)")


def group(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return 2
        return 1 if module.kernel_size == (1, 1) else 0
    return 3 if isinstance(module, nn.modules.batchnorm._BatchNorm) else 4


def shares(name: str, batch: int, size: int, threads: int) -> tuple[list[float], float, dict]:
    torch.manual_seed(0)
    model = lrx.build_model(f"torchvision:{name}", num_classes=1000).eval()
    timing = DeviceTiming(torch.device("cpu"), batch, (3, size, size), threads)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        net = timing._prepare(model, True, x, False)
    kinds = {n: group(m) for n, m in model.named_modules()}
    with MachineWatch(threads=threads) as watch, torch_threads(threads):
        part = module_times({"original": (net, contextlib.nullcontext)}, [], x, timing.device, 2, 5, 0.5)["original"]
    ms = [0.0] * len(GROUPS)
    for m in part["modules"]:
        ms[kinds.get(m["name"], 4)] += m["ms"]
    ms[4] += part["outside_ms"]
    return ms, part["total_ms"], watch.record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/cpu/time-shares.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# Where the CPU time goes, by what lrx can replace", "",
             f"`.venv/bin/python benchmarks/time_shares.py --models {' '.join(args.models)} --batch {args.batch} "
             f"--size {args.size} --threads {args.threads}` at commit {commit()}, on {cpu_name()} ({os.cpu_count()} "
             f"CPUs), torch {torch.__version__}. Random weights; the original in channels_last, timed per module "
             "(hooks add a little time per module: shares are of the hooked total). The ceiling is the speedup "
             "if every replaceable layer took no time; the second one with batch norm folded away as well.", "",
             "| model | hooked forward (ms) | " + " | ".join(GROUPS) + " | ceiling | ceiling, batch norm folded | "
             "machine while timing |",
             "|---|---|" + "---|" * len(GROUPS) + "---|---|---|"]
    for name in args.models:
        ms, total, machine = shares(name, args.batch, args.size, args.threads)
        replaceable = ms[0] + ms[1]
        lines.append(f"| {name} | {total:.1f} | " + " | ".join(f"{t:.1f} ({t / total:.0%})" for t in ms)
                     + f" | {total / (total - replaceable):.2f}x | "
                     f"{(total - ms[3]) / (total - ms[3] - replaceable):.2f}x | other processes "
                     f"{(machine['other_share'] or 0):.0%}{', BUSY' if machine['busy'] else ''} |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
