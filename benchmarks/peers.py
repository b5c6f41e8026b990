"""lrx against torch-pruning's L1 channel pruning, on one quick row's baseline: matched MACs, matched time.

    .venv/bin/python benchmarks/peers.py [--config configs/quick/exp17.yaml] [--runs-dir runs/quick]
        [--out results/cpu/peers.md] [--epochs 1] [--lr 1e-4]

Needs the row run first (``lrx run CONFIG --runs-dir RUNS``: its baseline and its expansion before
fine-tuning are read from there) and torch-pruning (``pip install torch-pruning``, an optional extra of
lrx's benchmarks, never a dependency of lrx itself). Without it the script says so and exits 2.

1. **lrx**: the row's expansion as decomposed (before its own fine-tuning).
2. **L1 pruning at matched MACs**: torch-pruning's ``MagnitudePruner`` with L1 importance, the same ratio of
   output channels in every conv and hidden linear layer (the last classifier layer kept), the ratio
   bisected until the whole model's MACs (ptflops, at the profile's input size) are at most lrx's.
3. **L1 pruning at matched time**: the same pruner, the ratio bisected until the pruned model's measured
   speedup (each model in its fastest layout, interleaved, :func:`lrx.measure.layouts.time_rounds`) is at
   least lrx's.

Each model is then fine-tuned by the same recipe (``--epochs`` of cross-entropy with AdamW at ``--lr``, the
kept epoch chosen on the row's validation images, its input a candidate: lrx.train.finetune.run_stage) and
evaluated on the row's whole test split. Accuracy with its 95% Wilson interval, and the paired difference
from the baseline on the same images (McNemar's exact test). Run it on an idle machine: it times models.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.config.settings import StageConfig, load_config, profile_input_size  # noqa: E402
from lrx.data.datasets import load_splits  # noqa: E402
from lrx.measure.accuracy import paired_difference, wilson  # noqa: E402
from lrx.measure.layouts import time_rounds  # noqa: E402
from lrx.measure.machine import MachineWatch  # noqa: E402
from lrx.measure.profiling import count  # noqa: E402
from lrx.measure.timing import eval_copy, torch_threads  # noqa: E402
from lrx.nn.inference import optimise  # noqa: E402
from lrx.pipeline.rundir import RunDir, load_model  # noqa: E402
from lrx.train.finetune import run_stage  # noqa: E402
from lrx.train.loop import correct_per_image  # noqa: E402
from lrx.measure.machine import cpu_name  # noqa: E402

BISECTIONS = 8  # steps of the pruning ratio's bisection: 1/256 of the range


def prune(model: nn.Module, ratio: float, input_size) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of every conv's and hidden linear layer's output channels removed by
    torch-pruning's L1 magnitude pruner (the last linear layer, the classes, kept)."""
    import torch_pruning as tp  # local: an optional extra of the benchmarks

    net = copy.deepcopy(model).eval()
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1:]
    example = torch.randn(1, *input_size)
    pruner = tp.pruner.MagnitudePruner(net, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=last)
    pruner.step()
    return net


def speedup(original: nn.Module, candidate: nn.Module, cfg, input_size) -> tuple[float, list[float], str]:
    """Measured speedup of ``candidate`` over ``original``, each in its fastest layout, in rounds."""
    p = cfg.profile
    cpu = torch.device("cpu")
    x = torch.randn(p.batch, *input_size)

    def make():
        plain = eval_copy(candidate, cpu)
        return eval_copy(original, cpu), optimise(eval_copy(candidate, cpu), cpu, x), plain

    with torch_threads(p.threads):
        timed = time_rounds(make, input_size, p.batch, cpu, p.warmup, p.repeats, p.rounds)
    return timed["speedup"], timed["round_speedups"], timed["expanded_layout"]


def bisect_ratio(fits, low: float = 0.0, high: float = 0.95) -> float:
    """The smallest pruning ratio in [low, high] for which ``fits(ratio)`` holds (it holds at ``high``)."""
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


def accuracy_cells(correct: torch.Tensor, reference: torch.Tensor | None) -> str:
    k, n = int(correct.sum()), int(correct.numel())
    low, high = wilson(k, n)
    cell = f"{100 * k / n:.2f} [{100 * low:.1f}, {100 * high:.1f}]"
    if reference is None:
        return cell + " | -"
    d = paired_difference(reference.numpy(), correct.numpy())
    return cell + f" | {100 * d.diff:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}], p={d.p:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/quick/exp17.yaml"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/quick"))
    parser.add_argument("--out", type=Path, default=Path("results/cpu/peers.md"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/peers.py: torch-pruning is not installed (pip install torch-pruning); nothing compared")
    cfg = load_config(args.config)
    runs = RunDir(args.runs_dir, cfg.name)
    base_file = RunDir(args.runs_dir, cfg.baseline).model_path("train")
    lrx_file = runs.model_path("decompose")
    for path in (base_file, lrx_file):
        if not path.exists():
            sys.exit(f"benchmarks/peers.py: {path} is missing; run lrx run {args.config} --runs-dir {args.runs_dir} first")
    torch.manual_seed(0)
    baseline = load_model(base_file, cfg.model.name, cfg.model.num_classes)[0].eval()
    expansion, replaced, _ = load_model(lrx_file, cfg.model.name, cfg.model.num_classes)
    input_size = profile_input_size(cfg)
    splits = load_splits(cfg)
    macs_base, params_base = count(baseline, input_size)
    macs_lrx, params_lrx = count(expansion, input_size)
    watch = MachineWatch(threads=cfg.profile.threads or torch.get_num_threads())
    with watch:
        lrx_speedup, lrx_rounds, lrx_layout = speedup(baseline, expansion, cfg, input_size)
        ratio_macs = bisect_ratio(lambda r: count(prune(baseline, r, input_size), input_size)[0] <= macs_lrx)
        ratio_time = bisect_ratio(lambda r: speedup(baseline, prune(baseline, r, input_size), cfg, input_size)[0]
                                  >= lrx_speedup)
        pruned = {"L1 pruning, matched MACs": prune(baseline, ratio_macs, input_size),
                  "L1 pruning, matched time": prune(baseline, ratio_time, input_size)}
        times = {name: speedup(baseline, net, cfg, input_size) for name, net in pruned.items()}
    recipe = StageConfig(ce=1.0, epochs=args.epochs, lr=args.lr)
    reference = correct_per_image(baseline, splits.test)
    rows = [("original", baseline, macs_base, params_base, None, "-", reference, None)]
    candidates = [("lrx: " + (cfg.remark or cfg.name), expansion, replaced, (lrx_speedup, lrx_rounds, lrx_layout))]
    # A pruned model's layers change shape; its L2 figure compares the logits, the one layer both models share.
    logits = [name for name, m in baseline.named_modules() if isinstance(m, nn.Linear)][-1:]
    candidates += [(name, net, logits, times[name]) for name, net in pruned.items()]
    for name, net, names, timed in candidates:
        before = correct_per_image(net, splits.test)
        tuned = copy.deepcopy(net)
        with tempfile.TemporaryDirectory() as tmp:
            run_stage(tuned, baseline, names, splits.train, splits.test, recipe, Path(tmp) / "stage.pt", quiet=True,
                      val=splits.val)
        after = correct_per_image(tuned, splits.test)
        macs, params = count(net, input_size)
        rows.append((name, net, macs, params, timed, before, after, None))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = watch.record
    lines = [f"# lrx against L1 channel pruning (torch-pruning {torch_pruning.__version__}) on {args.config}'s baseline",
             "",
             f"`.venv/bin/python benchmarks/peers.py --config {args.config} --runs-dir {args.runs_dir} --epochs "
             f"{args.epochs} --lr {args.lr}` at commit {commit}, on {cpu_name()} ({os.cpu_count()} CPUs), torch "
             f"{torch.__version__}, {cfg.profile.threads or torch.get_num_threads()} threads; while timing: other processes "
             f"{(machine['other_share'] or 0):.0%} of the CPUs, load average {machine['load_1m']}"
             f"{' (BUSY: ' + '; '.join(machine['reasons']) + ')' if machine['busy'] else ''}.",
             "",
             f"MACs by ptflops at {'x'.join(map(str, input_size))}; speedups measured at batch {cfg.profile.batch}, "
             f"each model in its fastest layout, median of {cfg.profile.rounds} rounds (per-round range in brackets). "
             f"Pruning ratios: {ratio_macs:.3f} of the channels for matched MACs, {ratio_time:.3f} for matched time. "
             f"Fine-tuning: {args.epochs} epoch(s) of cross-entropy, AdamW lr {args.lr}, the kept epoch (or the "
             f"input) chosen on the row's validation images; accuracy on all {int(reference.numel())} test images with its 95% interval, and the paired "
             f"difference from the original on the same images.",
             "",
             "| model | MACs(M) | params(M) | speedup | layout | acc@1 before | vs original | acc@1 after fine-tuning | vs original |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, _, macs, params, timed, before, after, _ in rows:
        if timed is None:
            lines.append(f"| {name} | {macs / 1e6:.1f} | {params / 1e6:.2f} | 1.00x | - | - | - | "
                         f"{accuracy_cells(after, None)} |")
            continue
        spread = f"{timed[0]:.2f}x [{min(timed[1]):.2f}-{max(timed[1]):.2f}]"
        lines.append(f"| {name} | {macs / 1e6:.1f} | {params / 1e6:.2f} | {spread} | {timed[2]} | "
                     f"{accuracy_cells(before, reference)} | {accuracy_cells(after, reference)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
