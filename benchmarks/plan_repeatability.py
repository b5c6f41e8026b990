"""Does one latency config plan the same twice on real timings, each time into an empty runs folder?

    .venv/bin/python benchmarks/plan_repeatability.py [--config configs/quick/exp20.yaml] [--trials 2]
        [--runs-dir runs/quick] [--fresh-cache]

Each trial is ``lrx decompose CONFIG --runs-dir TRIAL`` (a subprocess, as a user runs it), TRIAL a new
temporary runs folder that holds only a copy of the row's finished baseline run from ``--runs-dir`` (so that
no trial trains it again; without one, the trial trains it). All trials share one machine cache
(``LRX_CACHE_DIR``), new and empty when the benchmark starts, as every lrx run on a machine shares
``~/.cache/lrx``: the first trial measures every time the plan needs, the later ones reuse them. With
``--fresh-cache`` each trial has its own empty cache instead and measures everything again: what two machines
alike, or a deleted cache, would plan (results/cpu/plan-noise.txt shows why those plans differ).

Printed per trial: the plan's layers and ranks, its predicted and measured speedups, whether the target was
met, and which whole-model times came from the cache; then whether all trials chose the same plan (exit 1
when not). Run it on an idle machine: the planner spends real timings, so another process on the cores
changes what it measures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.config.settings import load_config  # noqa: E402


def trial(config: Path, name: str, baseline: Path | None, cache: Path, work: Path) -> dict:
    runs = work / "runs"
    runs.mkdir()
    if baseline is not None:
        shutil.copytree(baseline, runs / baseline.name)
    env = {**os.environ, "LRX_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-m", "lrx", "decompose", str(config), "--runs-dir", str(runs)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lrx decompose {config} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((runs / name / "metrics.json").read_text())["stages"]["decompose"]["plan"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/quick/exp20.yaml"))
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/quick"),
                        help="where the row's finished baseline run is (copied into each trial's runs folder)")
    parser.add_argument("--fresh-cache", action="store_true", help="each trial its own empty machine cache")
    args = parser.parse_args()
    config = args.config.resolve()
    cfg = load_config(config)
    baseline = args.runs_dir.resolve() / cfg.baseline if cfg.baseline else None
    if baseline is not None and not (baseline / "metrics.json").is_file():
        baseline = None
    print(f"{args.config}: {args.trials} trials, each `lrx decompose` into an empty runs folder"
          f"{' with a copy of the baseline run ' + str(baseline) if baseline else ''}; "
          f"{'each trial its own empty cache' if args.fresh_cache else 'one machine cache, empty at the start'}")
    plans = []
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(1, args.trials + 1):
            work = Path(tmp) / f"trial{number}"
            work.mkdir()
            cache = work / "cache" if args.fresh_cache else Path(tmp) / "cache"
            plan = trial(config, cfg.name, baseline, cache, work)
            chosen = dict(zip(plan["names"], plan["ranks"]))
            plans.append(chosen)
            reused = plan.get("cache", {}).get("reused", [])
            print(f"trial {number}: {chosen}; predicted {plan['predicted_speedup']:.2f}x, measured "
                  f"{plan['measured_speedup']:.2f}x, target met: {plan['target_met']}; layer tables "
                  f"{'cached' if all(row['cached'] for row in plan['table']) else 'measured'}, whole-model times "
                  f"{'cached: ' + ', '.join(r.split(':')[0] for r in reused) if reused else 'measured'}; "
                  f"machine: {plan.get('machine', {}).get('reasons') or 'quiet'}", flush=True)
    same = all(p == plans[0] for p in plans)
    print(f"the same plan in all {args.trials} trials: {'yes' if same else 'no'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
