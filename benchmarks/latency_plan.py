"""Do the latency rows (configs/quick/exp19-21) keep their promise? Measured, not counted.

    .venv/bin/python benchmarks/latency_plan.py [--runs-dir runs/quick] [--batches 16 64] [--repeats 15]

For each row: the plan it ran with (``stages.decompose.plan`` of its metrics.json under ``--runs-dir``),
or, where the row has not run, a fresh plan (:func:`lrx.plan.latency.plan_latency` on the trained baseline of
``--runs-dir`` if there is one, else on random weights: times do not depend on the weights, the ranks
do). The expansion is rebuilt from the plan's layers and ranks (random factors: time does not depend on
them) and timed again here, independently of the planner, against the original in its fastest plain
layout (:func:`lrx.measure.layouts.time_pair`: default, channels_last, NNPACK), at each batch of ``--batches``,
on the CPU with the row's threads (2).

Checks (exit code 1 if one fails):
- the 2.0x row (exp20) measures >= 2.0x whole-model at every batch;
- every row's predicted speedup is within 10% of the one measured here at the row's own batch (16).

Run it on a quiet machine: on a shared one the medians move by more than 10%.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lrx.config.settings import load_config
from lrx.base.errors import UserError
from lrx.plan.latency import DeviceTiming, plan_latency
from lrx.nn.surgery import build_expanded
from lrx.nn.models import build_model
from lrx.pipeline.rundir import RunDir, latency_cache_path, load_model

ROWS = ("exp19", "exp20", "exp21")
PROMISED = {"exp20": 2.0}  # row: whole-model speedup it must measure at every batch
TOLERANCE = 0.10


def the_plan(cfg, runs_dir: Path) -> tuple[dict, torch.nn.Module, str]:
    """(plan, original model, where the plan came from)."""
    original, source = build_model(cfg.model.name, cfg.model.num_classes), "random weights"
    baseline = RunDir(runs_dir, cfg.baseline)
    try:
        path = baseline.final_model_path()
        if path.exists():
            original, _, _ = load_model(path, cfg.model.name, cfg.model.num_classes)
            source = f"baseline {path}"
    except Exception:  # noqa: BLE001  a missing or unfinished baseline: plan on random weights
        pass
    metrics = RunDir(runs_dir, cfg.name).metrics_path
    if metrics.exists():
        plan = json.loads(metrics.read_text()).get("stages", {}).get("decompose", {}).get("plan")
        if plan and "latency" in plan.get("target", {}):
            return plan, original, f"the row's run ({metrics})"
    timing = DeviceTiming.from_config(cfg)
    timing.device = torch.device("cpu")
    plan = plan_latency(original, cfg.decompose.layers, cfg.decompose.target, timing,
                        cache=latency_cache_path(), log=print)
    return plan, original, f"planned now on {source}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs/quick")
    parser.add_argument("--configs", default="configs/quick")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    runs_dir, failures, results = Path(args.runs_dir), [], []
    print(f"{'row':6} {'target':>6} {'batch':>5} {'predicted':>9} {'measured':>8} {'vs default':>10} "
          f"{'original layout':>16}  layers: ranks")
    for row in args.rows:
        cfg = load_config(Path(args.configs) / f"{row}.yaml")
        try:
            plan, original, source = the_plan(cfg, runs_dir)
        except UserError as err:
            failures.append(f"{row}: no plan: {err}")
            continue
        spec = {"layers": plan["names"], "scheme": "v2", "ranks": plan["ranks"], "basis": "shared", "decomposed": False}
        expanded = build_expanded(original, spec)
        target = plan["target"]["latency"]
        for batch in args.batches:
            timing = DeviceTiming(torch.device("cpu"), batch, tuple(cfg.profile.input_size), cfg.profile.threads,
                                  warmup=2, repeats=args.repeats)
            measured = timing.whole(original, expanded)
            speedup = measured["original_ms"] / measured["expanded_ms"]
            default = measured["layouts"]["default"] / measured["expanded_ms"]
            predicted = plan["predicted_speedup"] if batch == plan["batch"] else None
            shown = f"{predicted:.2f}x" if predicted else "-"
            print(f"{row:6} {target:>5.2f}x {batch:>5} {shown:>9} {speedup:>7.2f}x {default:>9.2f}x "
                  f"{measured['layout']:>16}  {dict(zip(plan['names'], plan['ranks']))}")
            results.append({"row": row, "target": target, "batch": batch, "predicted": predicted, "measured": speedup,
                            "measured_vs_default": default, "original_layout": measured["layout"],
                            "layers": plan["names"], "ranks": plan["ranks"], "plan_from": source})
            if row in PROMISED and speedup < PROMISED[row]:
                failures.append(f"{row} at batch {batch}: {speedup:.2f}x < {PROMISED[row]}x")
            if predicted and abs(predicted / speedup - 1) > TOLERANCE:
                failures.append(f"{row}: predicted {predicted:.2f}x, measured {speedup:.2f}x (off by more than 10%)")
        print(f"       plan from {source}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(["FAILED: " + f for f in failures]) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
