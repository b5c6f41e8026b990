"""Two runs' final models timed against each other and their original in one process, interleaved.

    .venv/bin/python benchmarks/paired_speed.py ORIGINAL_RUN RUN_A RUN_B [--input-size 3,224,224] [--batch 16]
        [--threads 2] [--rounds 5] [--out FILE]

Each row's speedup in ``lrx table`` is measured against the original in its own profile; two rows' speedups
then come from two profiles, taken minutes apart, and their difference is partly the machine's drift. This
times the three models together: each round takes fresh copies, runs the original in each plain layout and
each expansion on lrx.nn.inference's paths and in those plain layouts (as ``lrx profile`` does,
:func:`lrx.measure.layouts.expansion_layouts`), all interleaved (:func:`lrx.measure.timing.interleaved`), and
takes each model's fastest layout (and, beside it, the original in PyTorch's default layout). A round's figures are ratios within the round; the summary gives their
median and range over the rounds. ``B over A`` above 1.0 means B ran faster. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lrx  # noqa: E402
from lrx.measure.layouts import expansion_layouts, forward_with_flags, original_layouts, plain_expansion  # noqa: E402
from lrx.measure.machine import MachineWatch, cpu_name  # noqa: E402
from lrx.measure.timing import eval_copy, interleaved, random_input, torch_threads  # noqa: E402
from lrx.nn.inference import optimise  # noqa: E402
from seed_spread import commit  # noqa: E402

CPU = torch.device("cpu")


def layouts(name: str, model: torch.nn.Module, x: torch.Tensor, original: bool) -> dict:
    """``{(name, layout): forward}``: the original in its plain layouts, an expansion as ``lrx profile`` runs it."""
    if original:
        ways = original_layouts(eval_copy(model, CPU), CPU)
    else:
        ways = expansion_layouts(optimise(eval_copy(model, CPU), CPU, x), CPU, plain_expansion(model, CPU))
    return {(name, layout): forward_with_flags(net, flags, x) for layout, (net, flags) in ways.items()}


def one_round(models: dict, x: torch.Tensor, repeats: int, min_time_s: float) -> dict[str, float]:
    """Each model's fastest layout's median (ms) in one interleaved round on fresh copies, and the original's in
    PyTorch's default layout ("original default")."""
    calls = {}
    for name, model in models.items():
        calls.update(layouts(name, model, x, original=name == "original"))
    with torch.inference_mode():
        stats = interleaved(calls, CPU, 2, repeats, min_time_s)
    fastest = {name: min(s["median_ms"] for (n, _), s in stats.items() if n == name) for name in models}
    return {**fastest, "original default": stats[("original", "default")]["median_ms"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (rounds {min(values):.2f}-{max(values):.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", help="the original's run folder (e.g. runs/original)")
    parser.add_argument("a", help="run A's folder")
    parser.add_argument("b", help="run B's folder")
    parser.add_argument("--input-size", default="3,224,224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds each layout runs per round, at least")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.input_size.split(","))
    models = {"original": lrx.load_run(args.original), "A": lrx.load_run(args.a), "B": lrx.load_run(args.b)}
    x = random_input(args.batch, size, CPU)
    rounds = []
    with torch_threads(args.threads), MachineWatch(threads=args.threads) as watch:
        for r in range(args.rounds):
            ms = one_round(models, x, args.repeats, args.min_time)
            rounds.append(ms)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
    a_speedups = [m["original"] / m["A"] for m in rounds]
    b_speedups = [m["original"] / m["B"] for m in rounds]
    b_over_a = [m["A"] / m["B"] for m in rounds]
    a_default = [m["original default"] / m["A"] for m in rounds]
    b_default = [m["original default"] / m["B"] for m in rounds]
    machine = watch.record
    lines = [
        f"`.venv/bin/python benchmarks/paired_speed.py {args.original} {args.a} {args.b} --input-size {args.input_size} "
        f"--batch {args.batch} --threads {args.threads} --rounds {args.rounds}` at commit {commit()}, on {cpu_name()} "
        f"({os.cpu_count()} CPUs), torch {torch.__version__}; other processes {machine['other_share'] or 0:.0%} of the "
        f"cores{', BUSY' if machine['busy'] else ''}.",
        "",
        "| | speedup over the original (its fastest plain layout) | over the original in PyTorch's default layout |",
        "|---|---|---|",
        f"| A: {args.a} | {spread(a_speedups)} | {spread(a_default)} |",
        f"| B: {args.b} | {spread(b_speedups)} | {spread(b_default)} |",
        f"| B over A (A's time / B's, paired in each round) | {spread(b_over_a)} | |",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
