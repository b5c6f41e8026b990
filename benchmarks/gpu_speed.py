"""Measured GPU speed of the expansions: whole model and its conv part, in three numeric settings.

    python benchmarks/gpu_speed.py [--batches 64 256] [--repeats 20]

alexnet_cifar10 (random weights, seed 0) at the seed's input (3x224x224): the original, scheme 1 at the
seed's bases 8,8,6,4, and scheme 2 at the ranks of ``plan_ranks(target={"speedup": 3.0 / 4.0})`` on
conv2-5. Settings: fp32 as PyTorch runs it by default (NCHW, TF32 off for convs), fp32 channels_last
with ``cudnn.benchmark`` (cuDNN picks the fastest algorithm per shape), and bf16 channels_last with
``cudnn.benchmark``. Each cell is ``median ms (speedup over the original in that setting)`` from CUDA
events, the models timed in turn within each round, after warm-up; "features" is ``model.features``
alone (conv1-5 with ReLUs and poolings), where the replaced layers are.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrx.expansion.model import expand
from lrx.nn.models import build_model
from lrx.plan.macs import plan_ranks

LAYERS, SEED_BASES = [2, 3, 4, 5], [8, 8, 6, 4]


def timed(nets: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each net on ``x``; every round times each net once, in an order that rotates."""
    names = list(nets)
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                nets[name](x)
        if x.is_cuda:
            torch.cuda.synchronize()
        runs = {name: [] for name in names}
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if x.is_cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    nets[name](x)
                    end.record()
                    end.synchronize()
                    runs[name].append(start.elapsed_time(end))
                else:
                    begin = time.perf_counter()
                    nets[name](x)
                    runs[name].append((time.perf_counter() - begin) * 1000)
    return {name: statistics.median(v) for name, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (--device cpu for a dry run)")
    torch.manual_seed(0)
    original = build_model("alexnet_cifar10").eval()
    models = {"original": original,
              "scheme 1, 8,8,6,4": expand(original, LAYERS, "v1", SEED_BASES)[0]}
    for target in (3.0, 4.0):
        ranks = plan_ranks(original, LAYERS, "v2", {"speedup": target})["ranks"]
        models[f"scheme 2 @{target:.0f}x {ranks}"] = expand(original, LAYERS, "v2", ranks)[0]
    settings = {"fp32 NCHW": (torch.float32, False), "fp32 NHWC + cudnn.benchmark": (torch.float32, True),
                "bf16 NHWC + cudnn.benchmark": (torch.bfloat16, True)}
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, 3x224x224, median of {args.repeats}")
    for batch in args.batches:
        for setting, (dtype, tuned) in settings.items():
            torch.backends.cudnn.benchmark = tuned
            fmt = torch.channels_last if tuned else torch.contiguous_format
            x = torch.randn(batch, 3, 224, 224, device=args.device, dtype=dtype).contiguous(memory_format=fmt)
            nets = {name: m.to(args.device, dtype).to(memory_format=fmt) for name, m in models.items()}
            for part in ("model", "features"):
                chosen = nets if part == "model" else {name: net.features for name, net in nets.items()}
                ms = timed(chosen, x, args.warmup, args.repeats)
                ref = ms["original"]
                cells = ", ".join(f"{name}: {t:.2f} ({ref / t:.2f}x)" for name, t in ms.items())
                print(f"batch {batch:4d} | {setting:28s} | {part:8s} | {cells}", flush=True)
            for m in models.values():
                m.to("cpu", torch.float32).to(memory_format=torch.contiguous_format)


if __name__ == "__main__":
    main()
