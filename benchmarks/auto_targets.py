"""A latency target on networks whose time is in 1x1 convs: torchvision resnet50 and mobilenet_v2, scheme auto.

    .venv/bin/python benchmarks/auto_targets.py [--models resnet50 mobilenet_v2] [--target 1.5] [--batch 16]
        [--size 224] [--threads 2] [--out results/cpu/auto-targets.md]

For each model (random weights, seed 0: time does not depend on the values): ``lrx.expand`` with
``layers="auto"``, ``scheme="auto"`` (scheme 2 or Tucker-2 for KxK convs, the channel scheme for 1x1 convs
and linear layers, or the layer kept dense) and ``target={"latency": X}``, planned on measured layer times at the batch
and size given (the planner's whole-model checks of one round each, to keep a resnet50 plan within minutes).
The expansion is then timed again, independently of the planner, against the original, each in its fastest
layout, 3 rounds (:func:`lrx.measure.layouts.time_rounds`); exported to ONNX (``lrx.export_model``) and run
in ONNX Runtime in a separate ``python -I`` process that does not import lrx, its outputs compared with the
expansion's. Written to ``--out`` with the machine and its load. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lrx  # noqa: E402
from lrx.measure.layouts import time_rounds  # noqa: E402
from lrx.measure.machine import MachineWatch  # noqa: E402
from lrx.measure.profiling import count  # noqa: E402
from lrx.measure.timing import eval_copy, torch_threads  # noqa: E402
from lrx.nn.channel import LowRankChannel  # noqa: E402
from lrx.nn.layers import LowRankExpConvV2  # noqa: E402
from lrx.nn.tucker import LowRankTucker2  # noqa: E402
from lrx.nn.inference import optimise  # noqa: E402
from lrx.plan.latency import DeviceTiming  # noqa: E402
from lrx.measure.machine import cpu_name  # noqa: E402

# Run in a python -I process: ONNX Runtime alone, no lrx on the path.
ORT_CHECK = """
import json, sys
import numpy as np, onnxruntime as ort
path, x_path, y_path = sys.argv[1:4]
x, want = np.load(x_path), np.load(y_path)
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
got = session.run(None, {session.get_inputs()[0].name: x})[0]
print(json.dumps({"max_abs_diff": float(np.abs(got - want).max()), "scale": float(np.abs(want).max())}))
"""


def onnx_check(model: torch.nn.Module, input_size, folder: Path) -> dict:
    """Export ``model`` to ONNX and compare ONNX Runtime's output (in a process without lrx) with torch's."""
    import numpy as np  # local: only this check needs it

    path = folder / "model.onnx"
    lrx.export_model(model, path, "onnx", input_size=input_size)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.eval()(x)
    np.save(folder / "x.npy", x.numpy())
    np.save(folder / "y.npy", want.numpy())
    done = subprocess.run([sys.executable, "-I", "-c", ORT_CHECK, str(path), str(folder / "x.npy"),
                           str(folder / "y.npy")], capture_output=True, text=True, cwd=folder)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--target", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/cpu/auto-targets.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    input_size = (3, args.size, args.size)
    cpu = torch.device("cpu")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"# A {args.target}x latency target with scheme auto on torchvision models", "",
             f"`.venv/bin/python benchmarks/auto_targets.py --models {' '.join(args.models)} --target {args.target} "
             f"--batch {args.batch} --size {args.size} --threads {args.threads}` at commit {commit}, on {cpu_name()} "
             f"({os.cpu_count()} CPUs), torch {torch.__version__}. Random weights (timing only); the speedup is "
             "measured after planning, each model in its fastest layout, median of 3 rounds (range of the "
             "rounds' own speedups in brackets).", "",
             "| model | layers replaced (v2 / channel / Tucker-2) | MACs(G) original -> expansion | planned | measured | "
             "layouts (original / expansion) | ONNX Runtime without lrx | plan time | machine while timing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        torch.manual_seed(0)
        model = lrx.build_model(f"torchvision:{name}", num_classes=1000).eval()
        timing = DeviceTiming(cpu, args.batch, input_size, args.threads, rounds=1)
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            expanded, report = lrx.expand(model, "auto", "auto", "auto", target={"latency": args.target},
                                          input_size=input_size, timing=timing, cache=Path(tmp) / "tables.json",
                                          log=lambda m: print(f"  {name}: {m}", flush=True))
        plan_s = time.monotonic() - start
        x = torch.randn(args.batch, *input_size)

        def make():
            return eval_copy(model, cpu), optimise(eval_copy(expanded, cpu), cpu, x), eval_copy(expanded, cpu)

        with MachineWatch(threads=args.threads) as watch, torch_threads(args.threads):
            timed = time_rounds(make, input_size, args.batch, cpu, 2, 5, 3)
        kinds = [type(m) for m in expanded.modules()]
        v2, channel, tucker = kinds.count(LowRankExpConvV2), kinds.count(LowRankChannel), kinds.count(LowRankTucker2)
        macs_before, macs_after = count(model, input_size)[0], count(expanded, input_size)[0]
        with tempfile.TemporaryDirectory() as tmp:
            check = onnx_check(lrx.to_plain(expanded), input_size, Path(tmp))
        onnx = (f"loads, max abs diff {check['max_abs_diff']:.1e} (outputs up to {check['scale']:.1e})"
                if "error" not in check else f"FAILED: {check['error']}")
        planned = report.plan.get("predicted_speedup") if isinstance(report.plan, dict) else None
        reachable = report.plan.get("best_reachable") if isinstance(report.plan, dict) else None
        out_of_reach = f" (out of reach: best {reachable:.2f}x by the layer times)" if reachable else ""
        rounds = timed["round_speedups"]
        machine = watch.record
        lines.append(f"| {name} | {v2 + channel + tucker} ({v2} / {channel} / {tucker}) | "
                     f"{macs_before / 1e9:.2f} -> {macs_after / 1e9:.2f} | "
                     f"{planned:.2f}x{out_of_reach} | {timed['speedup']:.2f}x [{min(rounds):.2f}-{max(rounds):.2f}] | "
                     f"{timed['original_layout']} / {timed['expanded_layout']} | {onnx} | {plan_s / 60:.1f} min | "
                     f"other processes {(machine['other_share'] or 0):.0%}{', BUSY' if machine['busy'] else ''} |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
