"""Tucker-2 against scheme 2, layer by layer, at equal weight error: which one runs faster?

    .venv/bin/python benchmarks/tucker_speed.py [--model alexnet_cifar10 --weights runs/quick/exp01/model.pt
        --size 64] [--errors 0.3 0.5 0.7] [--batch 16] [--threads 2] [--out results/cpu/tucker-speed.md]

For each KxK conv of the model (groups 1) and each relative weight error e (||W - W_hat||_F / ||W||_F): scheme 2
at the smallest rank whose optimal error is at most e (lrx.factor.decomposition.retained_energy), and Tucker-2
(lrx.nn.tucker, truncated HOSVD) at the smallest ranks (R1, R2) = (ceil(f C), ceil(f N)), f in steps of 1/64,
whose error is at most e. Each layer runs alone on its real input shape (batch, C, H, W at ``--size``), dense,
scheme 2 (on lrx's inference paths, as the latency planner times it) and Tucker-2 (three plain convs,
channels_last), interleaved, each at least 0.3 s. Weight error is not output error, so this compares the two
structures at equal filter fidelity, the planner's default proxy. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.factor.decomposition import retained_energy  # noqa: E402
from lrx.factor.tucker import tucker2_hosvd, tucker2_weight  # noqa: E402
from lrx.measure.machine import MachineWatch, cpu_name  # noqa: E402
from lrx.measure.profiling import count  # noqa: E402
from lrx.measure.timing import interleaved, torch_threads  # noqa: E402
from lrx.nn.inference import optimise  # noqa: E402
from lrx.nn.layers import LowRankExpConvV2  # noqa: E402
from lrx.nn.models import build_model  # noqa: E402
from lrx.nn.surgery import conv_sizes  # noqa: E402
from lrx.nn.tucker import LowRankTucker2  # noqa: E402
from lrx.pipeline.rundir import load_model  # noqa: E402

STEPS = 64


def scheme2_rank(weight: torch.Tensor, error: float) -> int:
    kept = retained_energy(weight, "v2")
    lost = (1 - kept).clamp(min=0).sqrt()
    return int(torch.nonzero(lost <= error)[0]) + 1


def tucker_ranks(weight: torch.Tensor, error: float) -> tuple[int, int]:
    n, c = weight.shape[:2]
    for step in range(1, STEPS + 1):
        ranks = (max(1, math.ceil(step * c / STEPS)), max(1, math.ceil(step * n / STEPS)))
        approx = tucker2_weight(tucker2_hosvd(weight.double(), ranks))
        if float((weight.double() - approx).norm() / weight.double().norm()) <= error:
            return ranks
    return c, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alexnet_cifar10")
    parser.add_argument("--weights", type=Path, default=Path("runs/quick/exp01/model.pt"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--errors", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/cpu/tucker-speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.weights.exists():
        model, source = load_model(args.weights, args.model, args.num_classes)[0].eval(), f"trained weights {args.weights}"
    else:
        torch.manual_seed(0)
        model, source = build_model(args.model, num_classes=args.num_classes).eval(), "random weights (seed 0)"
    input_size = (3, args.size, args.size)
    convs = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) != (1, 1)]
    sizes = conv_sizes(model, [name for name, _ in convs], input_size)
    cpu = torch.device("cpu")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"# Tucker-2 against scheme 2 per layer, at equal weight error ({args.model})", "",
             f"`.venv/bin/python benchmarks/tucker_speed.py --model {args.model} --weights {args.weights} --size "
             f"{args.size} --errors {' '.join(map(str, args.errors))} --batch {args.batch} --threads {args.threads}` "
             f"at commit {commit}, on {cpu_name()} ({os.cpu_count()} CPUs), torch {torch.__version__}; {source}. "
             "Times: each layer alone at batch "
             f"{args.batch}, interleaved, median ms; MACs per image by ptflops.", "",
             "| layer | input | error | scheme 2 rank | MACs(M) | ms | Tucker-2 ranks | MACs(M) | ms | dense ms | faster |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    with MachineWatch(threads=args.threads) as watch:
        for name, conv in convs:
            in_hw, _ = sizes[name]
            shape = (args.batch, conv.in_channels, *in_hw)
            x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
            for error in args.errors:
                rank = scheme2_rank(conv.weight.detach(), error)
                ranks = tucker_ranks(conv.weight.detach(), error)
                nets = {"dense": nn.Sequential(copy.deepcopy(conv)),
                        "v2": nn.Sequential(LowRankExpConvV2.from_conv(conv, rank)),
                        "tucker": nn.Sequential(LowRankTucker2.from_conv(conv, ranks))}
                macs = {k: count(net, shape[1:])[0] / 1e6 for k, net in nets.items()}
                with torch.no_grad():
                    nets = {k: optimise(copy.deepcopy(net).eval(), cpu, x, channels_last=True) for k, net in nets.items()}
                with torch_threads(args.threads), torch.inference_mode():
                    stats = interleaved({k: (lambda net=net: net(x)) for k, net in nets.items()}, cpu, 2, 5, 0.3)
                ms = {k: s["median_ms"] for k, s in stats.items()}
                faster = "Tucker-2" if ms["tucker"] < ms["v2"] else "scheme 2"
                lines.append(f"| {name} | {'x'.join(map(str, shape[1:]))} | {error:g} | {rank} | {macs['v2']:.1f} | "
                             f"{ms['v2']:.2f} | {ranks[0]}, {ranks[1]} | {macs['tucker']:.1f} | {ms['tucker']:.2f} | "
                             f"{ms['dense']:.2f} | {faster} |")
                print(lines[-1], flush=True)
    machine = watch.record
    lines += ["", f"Machine while timing: other processes {(machine['other_share'] or 0):.0%} of the CPUs"
              f"{', BUSY' if machine['busy'] else ''}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
