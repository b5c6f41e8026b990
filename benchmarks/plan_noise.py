"""How often the latency planner's choice changes when its measured times move by their noise.

    .venv/bin/python benchmarks/plan_noise.py RUN [RUN ...] [--trials 200] [--noise 0.05] [--layer-noise 0.03]
        [--targets 2.0 1.5]

RUN is a finished run folder whose metrics.json holds a latency plan (``decompose.plan``: every candidate
layer's times inside the model, dense and per rank); its baseline's model file gives the accuracy proxy
(retained filter energy, as the planner's default). Each trial multiplies every rank's time by its own
log-normal factor (``--noise``, the spread of one layer's times relative to its dense conv between two
measurements; 1-11% on the idle 2-core machine) and each layer's times by a common one (``--layer-noise``),
then chooses again with :func:`lrx.plan.latency.choose` for each target, as the planner's first choice does
(aiming 5% above the target, or at it, or, out of reach, the least lossy plan within ``REACH_SLACK`` of the
fastest). No timing is done: it runs in seconds, on any machine.

Printed per run and target: how many distinct plans the trials chose, the share of the commonest, and the
predicted speedup on the table as measured of its own plan and (range) of the trials' plans. A planner whose plans a second measurement would
repeat shows one plan; today's shows how far from that it is, and why (many options within the noise).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.plan import latency  # noqa: E402
from lrx.plan.macs import filter_energy  # noqa: E402
from lrx.pipeline.rundir import load_model  # noqa: E402


def run_table(run: Path) -> tuple[list[dict], dict, float, float]:
    """The plan's table, the proxy per layer, the whole original's time (ms, channels_last: the clock of the
    table's ``model_ms``) and the time it is compared with (its fastest plain layout)."""
    metrics = json.loads((run / "metrics.json").read_text())
    plan = metrics.get("decompose", {}).get("plan")
    if not plan or "table" not in plan:
        raise SystemExit(f"{run}: metrics.json holds no latency plan (decompose.plan.table)")
    config = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config the run was made with
    baseline = run.parent / metrics["baseline"] / "model.pt"
    model = load_model(baseline, config["model"]["name"], config["model"]["num_classes"])[0]
    modules = dict(model.named_modules())
    proxy = {row["name"]: filter_energy(modules[row["name"]], row["scheme"]) for row in plan["table"]}
    layouts = plan["baseline"]["layouts_ms"]
    return plan["table"], proxy, layouts["channels_last"], min(layouts.values())


def first_choice(table: list[dict], proxy: dict, clock_ms: float, base_ms: float, target: float) -> tuple[str, ...]:
    rest = max(clock_ms - sum(row["model_ms"][latency.DENSE] for row in table), 0.0)
    budgets = (base_ms / (target * (1 + latency.MARGIN)), base_ms / target)
    for budget in budgets:  # the margin above the target, then the target itself
        try:
            return tuple(latency.choose(table, proxy, rest, budget, 1.0))
        except ValueError as err:
            fastest = float(err.args[0])
    return tuple(latency.choose(table, proxy, rest, fastest * (1 + latency.REACH_SLACK), 1.0))


def predicted(table: list[dict], choice, clock_ms: float, base_ms: float) -> float:
    rest = clock_ms - sum(row["model_ms"][latency.DENSE] for row in table)
    return base_ms / (rest + sum(row["model_ms"][c] for row, c in zip(table, choice)))


def noisy(table: list[dict], rng: random.Random, noise: float, layer_noise: float) -> list[dict]:
    out = []
    for row in table:
        common = math.exp(rng.gauss(0, layer_noise))
        out.append({**row, "model_ms": {k: v * common * (1.0 if k == latency.DENSE else math.exp(rng.gauss(0, noise)))
                                        for k, v in row["model_ms"].items()}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--layer-noise", type=float, default=0.03)
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 1.5])
    args = parser.parse_args()
    print(f"{args.trials} trials, rank times x lognormal({args.noise}), each layer x lognormal({args.layer_noise})")
    for run in args.runs:
        table, proxy, clock_ms, base_ms = run_table(run)
        for target in args.targets:
            rng = random.Random(0)
            plans = collections.Counter(first_choice(noisy(table, rng, args.noise, args.layer_noise), proxy, clock_ms,
                                                     base_ms, target) for _ in range(args.trials))
            measured = first_choice(table, proxy, clock_ms, base_ms, target)
            speeds = [predicted(table, plan, clock_ms, base_ms) for plan in plans]  # each on the table as measured
            print(f"{run} ({len(table)} candidate layers), target {target:g}x: {len(plans)} distinct plans, the "
                  f"commonest {plans.most_common(1)[0][1] / args.trials:.0%}; on the table as measured the plan "
                  f"predicts {predicted(table, measured, clock_ms, base_ms):.2f}x, the noisy trials' plans "
                  f"{min(speeds):.2f}x-{max(speeds):.2f}x")


if __name__ == "__main__":
    main()
