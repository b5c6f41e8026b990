"""Does one latency config plan the same twice on real timings? Each trial from an empty table cache.

    .venv/bin/python benchmarks/plan_repeatability.py [--config configs/quick/exp20.yaml] [--trials 2]
        [--runs-dir runs/quick]

For each trial: a fresh temporary cache file, then :func:`lrx.plan.latency.plan_latency` with the config's
target, layers, scheme, alignment and timing (``DeviceTiming.from_config``: its batch, input size, threads,
repeats, rounds), on the trained baseline of ``--runs-dir`` when there is one, else on random weights (seed 0;
the times do not depend on the weights, the ranks' proxy does, and it is the same in every trial). The plan's
layers and ranks, its predicted and measured speedups, are printed per trial, then whether all trials chose
the same plan. Run it on an idle machine: the planner spends real timings, so another process on the cores
changes what it measures.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.config.settings import load_config  # noqa: E402
from lrx.nn.models import build_model  # noqa: E402
from lrx.pipeline.rundir import RunDir, load_model  # noqa: E402
from lrx.plan.latency import DeviceTiming, plan_latency  # noqa: E402
from lrx.measure.machine import cpu_name  # noqa: E402


def baseline(cfg, runs_dir: Path | None) -> tuple[torch.nn.Module, str]:
    if runs_dir is not None and cfg.baseline:
        model_file = RunDir(runs_dir, cfg.baseline).model_path("train")
        if model_file.exists():
            return load_model(model_file, cfg.model.name, cfg.model.num_classes)[0].eval(), f"the trained baseline {model_file}"
    torch.manual_seed(0)
    return build_model(cfg.model.name, num_classes=cfg.model.num_classes).eval(), "random weights (seed 0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/quick/exp20.yaml"))
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=None)
    args = parser.parse_args()
    cfg = load_config(args.config)
    d = cfg.decompose
    timing = DeviceTiming.from_config(cfg)
    torch.set_num_threads(timing.threads or torch.get_num_threads())
    model, source = baseline(cfg, args.runs_dir)
    print(f"{args.config}: target {d.target}, layers {d.layers}, scheme {d.scheme}; {source}; {cpu_name()}, "
          f"{timing.threads} threads, batch {timing.batch}, input {'x'.join(map(str, timing.input_size))}, "
          f"{timing.repeats} repeats x {timing.rounds} rounds")
    plans = []
    for trial in range(1, args.trials + 1):
        with tempfile.TemporaryDirectory() as tmp:
            plan = plan_latency(model, d.layers, d.target, timing, align=d.align, cache=Path(tmp) / "tables.json",
                                scheme=d.scheme)
        chosen = dict(zip(plan["names"], plan["ranks"]))
        plans.append(chosen)
        print(f"trial {trial}: {chosen}; predicted {plan['predicted_speedup']:.2f}x, measured "
              f"{plan['measured_speedup']:.2f}x, target met: {plan['target_met']}", flush=True)
    same = all(p == plans[0] for p in plans)
    print(f"the same plan in all {args.trials} trials: {'yes' if same else 'no'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
