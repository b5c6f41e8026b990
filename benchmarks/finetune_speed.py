"""How fast fine-tuning runs on this machine: an L2 epoch, a CE epoch, and the student alone.

    python benchmarks/finetune_speed.py                      # alexnet_cifar10 at 64x64, 256 images
    python benchmarks/finetune_speed.py --image-size 224 --images 512 --device cuda

Prints images/s of
  - an L2 epoch (teacher under inference_mode + student, loss on the replaced layers' outputs),
  - a CE epoch (student only, every parameter trains),
  - a plain forward + backward + AdamW step of the student on random tensors already in memory,
and the share of each epoch spent preparing batches (indexing, uint8 -> float, resize, normalise).
Targets: an L2 epoch costs at most 1.5x a CE epoch; data preparation is under 10% of an epoch.
The models are randomly initialised: speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lrx.config.settings import RuntimeConfig, StageConfig
from lrx.data.datasets import Batches, synthetic
from lrx.train.finetune import LayerTaps, freeze_for_stage, set_stage_modes, stage_loss
from lrx.expansion.model import expand
from lrx.nn.models import build_model, conv_layers
from lrx.train.baseline import prepare_model, train_one_epoch


class TimedBatches:
    """Batches that add up the time spent producing each batch (synchronising the GPU first)."""

    def __init__(self, batches):
        self.batches, self.seconds = batches, 0.0

    def set_epoch(self, epoch):
        self.batches.set_epoch(epoch)

    def __len__(self):
        return len(self.batches)

    @property
    def device(self):
        return self.batches.device

    def __iter__(self):
        it = iter(self.batches)
        while True:
            sync(self.batches.device)
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            sync(self.batches.device)
            self.seconds += time.perf_counter() - start
            yield batch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def epoch_time(student, teacher, names, batches, stage, runtime, repeats):
    """Median seconds of one training epoch of ``stage`` and the median share spent on batches."""
    pure_l2 = stage.ce == 0
    trainable = freeze_for_stage(student, names, pure_l2)
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
    times, shares = [], []
    for epoch in range(repeats + 1):  # epoch 0 warms up (allocator, oneDNN/cuDNN kernel choice)
        timed = TimedBatches(batches)
        set_stage_modes(student, names, pure_l2)
        with LayerTaps(teacher, names, stop_early=True) as t_taps, LayerTaps(student, names, stop_early=pure_l2) as s_taps:
            sync(batches.device)
            start = time.perf_counter()
            train_one_epoch(student, timed, optimizer, stage_loss(teacher, names, stage, t_taps, s_taps), epoch,
                            runtime=runtime, quiet=True)
            sync(batches.device)
            seconds = time.perf_counter() - start
        if epoch > 0:
            times.append(seconds)
            shares.append(timed.seconds / seconds)
    student.requires_grad_(True)
    return statistics.median(times), statistics.median(shares)


def plain_time(student, n_images, batch, size, device, repeats):
    """Median seconds of forward + backward + AdamW step over ``n_images`` random images, no data work."""
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    steps = -(-n_images // batch)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for rep in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(student(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        if rep > 0:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="alexnet_cifar10")
    parser.add_argument("--image-size", type=int, default=64, help="pixels of the square images fed to the models")
    parser.add_argument("--images", type=int, default=256, help="images per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5], help="1-based conv positions")
    parser.add_argument("--bases", type=int, nargs="+", default=[8, 8, 6, 4])
    parser.add_argument("--scheme", default="v1", choices=["v1", "v2"])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per measurement (median), after a warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only)")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runtime = RuntimeConfig(device=args.device, bf16=args.bf16, channels_last=args.channels_last)

    torch.manual_seed(0)
    teacher = build_model(args.model, 10).eval()
    input_size = (3, args.image_size, args.image_size)
    student, report = expand(teacher, layers=args.layers, scheme=args.scheme, ranks=args.bases, input_size=input_size)
    names = [layer["name"] for layer in report.layers]
    prepare_model(teacher, device, runtime)
    prepare_model(student, device, runtime)
    images, labels = synthetic(args.images, size=32, seed=0)
    batches = Batches(images, labels, args.batch, args.image_size, device, shuffle=True, seed=0)

    l2_s, l2_data = epoch_time(student, teacher, names, batches, StageConfig(l2=1.0, epochs=1), runtime, args.repeats)
    ce_s, ce_data = epoch_time(student, teacher, names, batches, StageConfig(ce=1.0, epochs=1), runtime, args.repeats)
    plain_s = plain_time(student, args.images, args.batch, args.image_size, device, args.repeats)

    convs = [n for n, _ in conv_layers(teacher)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}, scheme {args.scheme}, layers {','.join(map(str, args.layers))} ({', '.join(names)} of "
          f"{len(convs)} convs), bases {','.join(map(str, args.bases))}")
    print(f"{args.images} images of {args.image_size}x{args.image_size}, batch {args.batch}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {load:.1f}, "
          f"median of {args.repeats} epochs after a warm-up")
    print(f"{'':34} {'images/s':>9} {'epoch s':>8} {'data':>6}")
    print(f"{'L2 epoch (teacher + student)':34} {args.images / l2_s:9.1f} {l2_s:8.3f} {l2_data:6.1%}")
    print(f"{'CE epoch (student)':34} {args.images / ce_s:9.1f} {ce_s:8.3f} {ce_data:6.1%}")
    print(f"{'student fwd+bwd+step, random input':34} {args.images / plain_s:9.1f} {plain_s:8.3f} {'-':>6}")
    ratio = l2_s / ce_s
    print(f"L2 epoch / CE epoch: {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'MISSED'})")
    worst = max(l2_data, ce_data)
    print(f"data preparation: at most {worst:.1%} of an epoch (target < 10%: {'met' if worst < 0.10 else 'MISSED'})")
    print(f"CE epoch / plain student: {ce_s / plain_s:.2f}x (the loop's overhead over bare compute)")


if __name__ == "__main__":
    main()
