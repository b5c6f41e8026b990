"""Baseline training: the original model (the seed's row 1) with cross-entropy, as ``TrainConfig`` says.

The epoch loop (checkpoint after every epoch, resume, keep-best, NaN stop) is :func:`lrx.train.loop.fit`,
shared with :mod:`lrx.train.finetune`; this module adds the optimiser, the learning-rate schedule and the loss.
``train_one_epoch``, ``evaluate`` and ``TrainingDiverged`` are also reachable here, as before.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrx.base import distributed
from lrx.config.settings import RuntimeConfig, TrainConfig
from lrx.base.errors import TrainingDiverged, UserError
from lrx.measure.accuracy import pack, percent
from lrx.train.loop import (LossFn, batches_device, correct_per_image, evaluate, fit, for_model, is_better, main_log,
                            prepare_model, resume, start_device, train_one_epoch)

__all__ = ["TrainingDiverged", "adamw", "batches_device", "cross_entropy", "evaluate", "fusable", "is_better",
           "lr_factor", "prepare_model", "selection", "train_baseline", "train_one_epoch"]

Log = Callable[[str], None]


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    """The plain classification loss as a ``loss_fn(model, x, y)``."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)

    return loss_fn


# ---------------------------------------------------------------- baseline training


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether PyTorch's fused optimiser kernels take ``params``: floating point, on the CPU or a GPU.

    The fused kernel updates all parameters in one pass; on 2 CPU cores AdamW's step on the seed's
    AlexNet (44M parameters) runs about 8x faster fused than by default (benchmarks/optimizer_speed.py),
    which doubles training throughput at batch 32.
    """
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def adamw(params, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over ``params``, with the fused kernel where :func:`fusable` allows it."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fusable(params) or None)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fusable(params) or None)
    if cfg.optimizer == "adamw":
        return adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; allowed: sgd, adamw", key="train.optimizer")


def lr_factor(step: int, total: int, warmup: int, cosine: bool) -> float:
    """The multiplier of the base learning rate before optimiser step ``step`` (0-based) of ``total``.

    A linear warm-up over the first ``warmup`` steps ((step + 1) / warmup), then, with ``cosine``,
    half a cosine from 1 down to 0 at the last step; without, 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    span = max(total - warmup - 1, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step schedule (:func:`lr_factor`), or None for a constant learning rate."""
    if cfg.scheduler not in ("cosine", "none"):
        raise UserError(f"unknown scheduler {cfg.scheduler!r}; allowed: cosine, none", key="train.scheduler")
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.scheduler == "none" and warmup == 0:
        return None
    total, cosine = cfg.epochs * steps_per_epoch, cfg.scheduler == "cosine"
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, cosine))


def selection(val, epochs: int, keep: str) -> str | None:
    """What a stage's kept model was chosen on: "validation" (``val`` given), "test", or None when nothing
    was chosen (no epoch ran, or ``keep: last``)."""
    if epochs == 0 or keep == "last":
        return None
    return "validation" if val is not None else "test"


def train_baseline(model: nn.Module, train, test, cfg: TrainConfig, ckpt_path, log: Log | None = None,
                   quiet: bool = False, runtime: RuntimeConfig | None = None, seed: int = 0,
                   on_epoch: Callable[[int, dict], None] | None = None, val=None) -> dict:
    """Train ``model`` with cross-entropy as ``cfg`` says, resuming from ``ckpt_path`` if it exists.

    A checkpoint ``{model, optimizer, scheduler, epoch, best, best_epoch, history, rng, settings, wall_s}``
    is written atomically after every epoch (and before the first, as epoch 0), by rank 0 only. On
    return ``model`` holds the kept epoch's weights (``cfg.keep``: best-acc or last).

    Parameters
    ----------
    model : the freshly built model (moved to the batches' device here).
    train, test : :class:`lrx.data.datasets.Batches` (unsharded; each process takes its shard under DDP), or any
        iterable of (images, labels) batches, as :func:`lrx.train.finetune.run_stage` takes them.
    val : batches of validation images, disjoint from ``train``: every epoch is evaluated on them and the
        kept epoch chosen on them; the test images are evaluated once, on the kept model. None: every epoch
        is evaluated on ``test`` and chosen on it (optimistic; ``selected_on`` says so).
    log : receives one line per epoch (rank 0 only).
    on_epoch : called as ``on_epoch(epoch, record)`` after each epoch's checkpoint is written.

    Returns
    -------
    ``{"acc1", "best_epoch", "epochs": [{"epoch", "loss", "acc1"}], "wall_s", "selected_on", "test_correct"}``:
    ``acc1`` on the test images; each epoch's ``acc1`` on the images it was chosen on (``selected_on``:
    "validation", "test", or None when nothing was chosen), ``val_acc1`` the kept epoch's with ``val``;
    ``test_correct`` the kept model's per-image correctness on the test images
    (:func:`lrx.measure.accuracy.pack`); ``wall_s`` adds up the time of every session that trained this
    checkpoint.

    Raises
    ------
    TrainingDiverged
        when the loss becomes NaN or infinite; the checkpoint of the last finished epoch is kept.
    """
    started = time.perf_counter()
    runtime = runtime or RuntimeConfig()
    train, test = for_model(train, model), for_model(test, model)
    chooser = for_model(val, model) if val is not None else test
    device = start_device(train)
    say = main_log(log)
    ckpt_path = Path(ckpt_path)
    prepare_model(model, device, runtime)
    model.train()
    optimizer = _optimizer(model, cfg)
    net = distributed.wrap(model, device)
    train_b, test_b, chooser_b = distributed.shard(train), distributed.shard(test), distributed.shard(chooser)
    scheduler = _scheduler(optimizer, cfg, len(train_b))
    loss_fn = cross_entropy(cfg.label_smoothing)
    settings = {"kind": "train", "train": dataclasses.asdict(cfg), "seed": seed}
    if val is not None:  # a checkpoint chosen on the test images is not resumed as one chosen on validation
        settings["selected_on"] = "validation"
    torch.manual_seed(seed + distributed.rank())

    state = resume(ckpt_path, settings, model, optimizer, scheduler)
    if state.resumed and state.next_epoch <= cfg.epochs:
        say(f"resuming training from epoch {state.next_epoch} of {cfg.epochs} ({ckpt_path})")
    fit(net, train_b, optimizer, state, cfg.epochs, epoch_loss=lambda: contextlib.nullcontext(loss_fn),
        evaluate_epoch=lambda: {"acc1": evaluate(model, chooser_b, runtime, total=chooser.num_images)}, keep=cfg.keep,
        ckpt_path=ckpt_path, settings=settings, started=started, scheduler=scheduler, runtime=runtime,
        label="train", quiet=quiet, say=say, on_epoch=on_epoch, split="validation" if val is not None else None)

    correct = correct_per_image(model, test_b, runtime, total=test.num_images)  # the kept model, once
    if val is None:  # chosen on the test images: the kept epoch's figure is the test figure
        acc1 = state.best["acc1"] if state.history else evaluate(model, test_b, runtime, total=test.num_images)
    else:
        acc1 = percent(correct)
    model.train()
    result = {"acc1": acc1, "best_epoch": state.best_epoch, "epochs": state.history,
              "wall_s": round(state.wall(started), 3), "selected_on": selection(val, len(state.history), cfg.keep),
              "test_correct": pack(correct.numpy())}
    if val is not None and state.best is not None:
        result["val_acc1"] = state.best["acc1"]
    return result
