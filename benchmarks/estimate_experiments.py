"""Estimate how long `make all-experiments` takes on this machine, from a few measured steps.

Times a few steps at the seed's scale (batch 64, 3x224x224): CE training of the original model (row 1),
L2 and CE fine-tuning of the seed's expansion (the student, every parameter training under CE), then multiplies by the epochs that configs/exp01..09 ask for on
CIFAR-10 (50,000 training and 10,000 test images). Prints per-step times and the estimate.

    python benchmarks/estimate_experiments.py [--device cuda] [--steps 3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lrx.config.settings import load_config
from lrx.train.finetune import LayerTaps, squared_distances
from lrx.expansion.model import expand
from lrx.nn.models import build_model
from lrx.train.baseline import adamw

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000


def duration(seconds: float) -> str:
    """Seconds as the unit that reads best: "42 s", "3.5 min" or "1.2 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def timed(step, steps: int, device: torch.device) -> float:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def ce_step_of(net: torch.nn.Module):
        """One CE training step of every parameter of ``net``, AdamW as lrx trains (fused where it can be)."""
        opt = adamw(net.parameters(), lr=1e-4, weight_decay=0.01)

        def step():
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    model = build_model("alexnet_cifar10").to(device)
    ce_step = ce_step_of(model)

    student, report = expand(build_model("alexnet_cifar10"), [2, 3, 4, 5], "v1", [8, 8, 6, 4])
    student.to(device).eval()
    names = [layer["name"] for layer in report.layers]
    params = [p for n, p in student.named_parameters() if any(n.startswith(k + ".") for k in names)]
    opt_l2 = adamw(params, lr=1e-4, weight_decay=0.01)
    teacher = model

    ce_student_step = ce_step_of(student)

    def l2_step():
        with torch.inference_mode():
            t_taps(teacher, x)
        teacher_out = {k: v.clone() for k, v in t_taps.outputs.items()}
        s_taps(student, x)
        loss = squared_distances(s_taps.outputs, teacher_out, names).sum(0).mean()
        opt_l2.zero_grad()
        loss.backward()
        opt_l2.step()

    def eval_step():
        with torch.inference_mode():
            model(x)

    model.train()
    ce = timed(ce_step, args.steps, device)
    model.eval()
    ev = timed(eval_step, args.steps, device)
    with LayerTaps(teacher, names, stop_early=True) as t_taps, LayerTaps(student, names, stop_early=True) as s_taps:
        l2 = timed(l2_step, args.steps, device)
    student.train()
    ce_ft = timed(ce_student_step, args.steps, device)
    steps = -(-TRAIN_IMAGES // args.batch)
    epoch_ce, epoch_ce_ft, epoch_l2 = ce * steps, ce_ft * steps, l2 * steps
    epoch_eval = ev * -(-TEST_IMAGES // args.batch) * 2  # acc@1 and the L2 norm after every epoch
    root = Path(__file__).resolve().parents[1] / "configs"
    total = 0.0
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, 3x224x224")
    print(f"per step: CE train (original) {ce * 1e3:.0f} ms, L2 fine-tune {l2 * 1e3:.0f} ms, "
          f"CE fine-tune (expansion) {ce_ft * 1e3:.0f} ms, eval {ev * 1e3:.0f} ms")
    print(f"per CIFAR-10 epoch: CE train {duration(epoch_ce)}, L2 fine-tune {duration(epoch_l2)}, "
          f"CE fine-tune {duration(epoch_ce_ft)}, evaluation {duration(epoch_eval)}")
    for i in range(1, 10):
        cfg = load_config(root / f"exp0{i}.yaml")
        seconds = (cfg.train.epochs * (epoch_ce + epoch_eval)) if cfg.baseline is None else 0.0
        for stage in cfg.finetune:
            per = epoch_ce_ft if stage.ce > 0 else epoch_l2
            seconds += stage.epochs * (per + epoch_eval)
        total += seconds
        print(f"exp0{i}: {duration(seconds)}")
    print(f"all nine rows: about {duration(total)} (profiling and decomposition add minutes)")


if __name__ == "__main__":
    main()
