"""Training as plain functions, after torchvision's ``references/classification/train.py``.

``train_one_epoch`` runs one pass with any loss, ``evaluate`` returns acc@1, and ``train_baseline``
trains the original model (the seed's row 1) with a checkpoint after every epoch that it resumes from.
The helpers here (RNG states, the epoch checkpoint, the keep rule) are shared with :mod:`lrx.finetune`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import load_checkpoint, save_atomic
from .config import RuntimeConfig, TrainConfig
from .errors import UserError
from .progress import progress

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Log = Callable[[str], None]

# Loss values stay on the device and are checked for NaN/inf every this many steps: a host sync
# per step would stall a GPU; the check still names the first bad step exactly.
CHECK_EVERY = 20


class TrainingDiverged(UserError):
    """The loss became NaN or infinite. The checkpoint on disk (the last finished epoch) is kept;
    the model in memory holds the diverged weights and should not be used."""

    def __init__(self, value: float, epoch: int, step: int, steps: int, ckpt_path=None, last_good: int | None = None):
        self.value, self.epoch, self.step = value, epoch, step
        kept = f"; the checkpoint of epoch {last_good} is kept" if last_good is not None else ""
        super().__init__(f"the loss became {value} at epoch {epoch}, step {step} of {steps}; training stopped{kept}. "
                         "Lower the learning rate or the loss weights and run again",
                         file=str(ckpt_path) if ckpt_path is not None else None)


# ---------------------------------------------------------------- runtime


def autocast(runtime: RuntimeConfig | None, device: torch.device):
    """bf16 autocast when the runtime asks for it and the device is a GPU; otherwise nothing."""
    if runtime is not None and runtime.bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_memory_format(x: torch.Tensor, runtime: RuntimeConfig | None) -> torch.Tensor:
    if runtime is not None and runtime.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_model(model: nn.Module, device: torch.device, runtime: RuntimeConfig | None) -> nn.Module:
    """Move ``model`` to ``device`` (channels_last when asked) in place; returns it."""
    if runtime is not None and runtime.channels_last:
        return model.to(device=device, memory_format=torch.channels_last)
    return model.to(device)


def batches_device(batches) -> torch.device:
    """Where ``batches`` are prepared (an explicit GPU index for ``cuda``)."""
    return distributed.local_device(getattr(batches, "device", "cpu"))


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit (a frozen student mixes both)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def rng_state() -> dict:
    """This process's torch RNG states (CPU, and CUDA when in use): dropout draws from them."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": list(cuda)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states() -> list:
    """Every rank's RNG states, in rank order (a collective call under DDP)."""
    return distributed.gather(rng_state())


def restore_rng_states(states: list) -> None:
    """Restore this rank's entry of :func:`all_rng_states` (rank 0's when the world size changed)."""
    r = distributed.rank()
    set_rng_state(states[r] if r < len(states) else states[0])


def cpu_state(model: nn.Module) -> dict:
    """A copy of ``model``'s state_dict on the CPU (the best epoch's weights while later epochs train)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in distributed.unwrap(model).state_dict().items()}


def is_better(record: dict, best: dict | None, keep: str) -> bool:
    """Whether the epoch ``record`` replaces the kept one under the rule ``keep``.

    ``best-acc``: higher acc1 (ties keep the earlier epoch); ``best-l2``: lower l2; ``last``: always.
    """
    if best is None or keep == "last":
        return True
    if keep == "best-acc":
        return record["acc1"] > best["acc1"]
    if keep == "best-l2":
        return record["l2"] < best["l2"]
    raise UserError(f"unknown keep rule {keep!r}; allowed: best-acc, best-l2, last", key="keep")


def load_weights(model: nn.Module, state: dict, path) -> None:
    """``model.load_state_dict(state)`` with a one-line error naming the checkpoint when they do not fit."""
    try:
        distributed.unwrap(model).load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        first = " ".join(str(err).split())[:200]
        raise UserError(f"the checkpoint does not fit the model ({first}); delete it to start over", file=str(path)) from None


def resume(ckpt_path, settings: dict, model: nn.Module, optimizer, scheduler=None):
    """The loop state to start from: fresh, or restored from the per-epoch checkpoint at ``ckpt_path``.

    Restores the weights, the optimizer (and scheduler) and every rank's RNG state from the checkpoint.
    Returns ``(history, best_epoch, best, best_state, wall_before, start, ckpt)``; ``ckpt`` is None when
    starting fresh, else the loaded checkpoint (for caller-specific keys).
    """
    if not distributed.file_exists(ckpt_path):
        return [], 0, None, None, 0.0, 1, None
    ckpt = load_checkpoint(ckpt_path)
    check_settings(ckpt, settings, ckpt_path)
    load_weights(model, ckpt["model"], ckpt_path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    history, best_epoch = list(ckpt["history"]), ckpt["best_epoch"]
    best = next((r for r in history if r["epoch"] == best_epoch), None)
    best_state = ckpt["best"] if ckpt["best"] is not None else (cpu_state(model) if best_epoch else None)
    restore_rng_states(ckpt["rng"])
    return history, best_epoch, best, best_state, ckpt["wall_s"], ckpt["epoch"] + 1, ckpt


def check_settings(ckpt: dict, settings: dict, path) -> None:
    """Refuse to resume a checkpoint written with other settings."""
    old = ckpt.get("settings")
    if old == settings:
        return
    if not isinstance(old, dict):
        raise UserError("not a checkpoint of this kind of stage; delete it to start over", file=str(path))
    diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    raise UserError(f"the checkpoint was written with other settings ({'; '.join(diff)}); delete it "
                    "(or run with --force) to start over", file=str(path))


# ---------------------------------------------------------------- the loop


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    """The plain classification loss as a ``loss_fn(model, x, y)``."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)

    return loss_fn


def train_one_epoch(model: nn.Module, batches, optimizer: torch.optim.Optimizer, loss_fn: LossFn, epoch: int, *,
                    runtime: RuntimeConfig | None = None, description: str = "train", quiet: bool = True,
                    scheduler=None) -> float:
    """One pass over ``batches`` (reshuffled with ``batches.set_epoch(epoch)``).

    Parameters
    ----------
    model : the model the optimizer updates (it may be wrapped in DistributedDataParallel); its
        train/eval flags are the caller's choice and are left alone.
    batches : yields (x float32 (B, 3, S, S), y int64 (B,)) on the model's device.
    loss_fn : ``loss_fn(model, x, y) -> scalar tensor``.
    scheduler : stepped once per batch when given (the baseline's warm-up and cosine schedule).

    Returns
    -------
    The mean loss over the epoch's steps (averaged over processes under DDP).

    Raises
    ------
    TrainingDiverged
        naming the epoch and the first step whose loss was NaN or infinite.
    """
    device = batches_device(batches)
    batches.set_epoch(epoch)
    steps = len(batches)
    total = torch.zeros((), dtype=torch.float64, device=device)
    pending: list[torch.Tensor] = []
    done = 0
    with progress(steps, description, quiet) as bar:
        for step, (x, y) in enumerate(batches, 1):
            x = to_memory_format(x, runtime)
            with autocast(runtime, device):
                loss = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            pending.append(loss.detach().float())
            if len(pending) == CHECK_EVERY or step == steps:
                values = torch.stack(pending)
                finite = torch.isfinite(values)
                if distributed.any_true(not bool(finite.all()), device):
                    bad = (~finite).nonzero()
                    first = int(bad[0]) if len(bad) else len(pending) - 1  # another rank diverged
                    raise TrainingDiverged(float(values[first]), epoch, done + first + 1, steps)
                total += values.double().sum()
                done += len(pending)
                pending = []
                bar.advance(0, loss=float(total) / done)
            bar.advance()
    if done == 0:
        raise UserError("no training batches: the training split is empty or smaller than one batch", key="data")
    stats = distributed.all_reduce_sum(torch.stack([total, torch.tensor(float(done), dtype=torch.float64, device=device)]))
    return float(stats[0] / stats[1])


@torch.inference_mode()
def evaluate(model: nn.Module, batches, runtime: RuntimeConfig | None = None, total: int | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` on ``batches`` (eval mode; flags restored after).

    Under DDP pass this rank's shard and ``total``, the unsharded number of images: the padding a
    shard repeats is not counted, so the result equals a single process's.
    """
    model = distributed.unwrap(model)
    device = batches_device(batches)
    limit = distributed.own_count(total) if total is not None else None
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    with kept_modes(model):
        model.eval()
        for x, y in batches:
            if limit is not None and seen + len(y) > limit:
                x, y = x[: limit - seen], y[: limit - seen]
            if len(y) == 0:
                break
            with autocast(runtime, device):
                logits = model(to_memory_format(x, runtime))
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    stats = distributed.all_reduce_sum(torch.stack([correct, torch.tensor(float(seen), dtype=torch.float64, device=device)]))
    if stats[1] == 0:
        raise UserError("no test images to evaluate on", key="data")
    return float(100.0 * stats[0] / stats[1])


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


def train_baseline(model: nn.Module, train, test, cfg: TrainConfig, ckpt_path, log: Log | None = None,
                   quiet: bool = False, runtime: RuntimeConfig | None = None, seed: int = 0,
                   on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``model`` with cross-entropy as ``cfg`` says, resuming from ``ckpt_path`` if it exists.

    A checkpoint ``{model, optimizer, scheduler, epoch, best, best_epoch, history, rng, settings}`` is
    written atomically after every epoch (and before the first, as epoch 0), by rank 0 only. On return
    ``model`` holds the kept epoch's weights (``cfg.keep``: best-acc or last).

    Parameters
    ----------
    model : the freshly built model (moved to the batches' device here).
    train, test : :class:`lrx.data.Batches` (unsharded; each process takes its shard under DDP).
    log : receives one line per epoch (rank 0 only).
    on_epoch : called as ``on_epoch(epoch, record)`` after each epoch's checkpoint is written.

    Returns
    -------
    ``{"acc1", "best_epoch", "epochs": [{"epoch", "loss", "acc1"}], "wall_s"}``; ``wall_s`` adds up
    the time of every session that trained this checkpoint.
    """
    started = time.perf_counter()
    runtime = runtime or RuntimeConfig()
    device = batches_device(train)
    distributed.setup(device)
    device = batches_device(train)
    say = log if (log is not None and distributed.is_main()) else (lambda message: None)
    ckpt_path = Path(ckpt_path)
    prepare_model(model, device, runtime)
    model.train()
    optimizer = _optimizer(model, cfg)
    net = distributed.wrap(model, device)
    train_b, test_b = distributed.shard(train), distributed.shard(test)
    scheduler = _scheduler(optimizer, cfg, len(train_b))
    loss_fn = cross_entropy(cfg.label_smoothing)
    settings = {"kind": "train", "train": dataclasses.asdict(cfg), "seed": seed}
    torch.manual_seed(seed + distributed.rank())

    history, best_epoch, best, best_state, wall_before, start, ckpt = resume(ckpt_path, settings, model, optimizer,
                                                                            scheduler)
    if ckpt is not None and start <= cfg.epochs:
        say(f"resuming training from epoch {start} of {cfg.epochs} ({ckpt_path})")

    def save(epoch: int) -> None:
        rng = all_rng_states()  # collective: every rank takes part
        if distributed.is_main():
            save_atomic({"model": distributed.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None, "epoch": epoch,
                         "best": None if best_epoch == epoch else best_state, "best_epoch": best_epoch,
                         "history": history, "rng": rng, "settings": settings,
                         "wall_s": wall_before + time.perf_counter() - started}, ckpt_path)

    if start == 1:
        save(0)
    for epoch in range(start, cfg.epochs + 1):
        model.train()
        try:
            loss = train_one_epoch(net, train_b, optimizer, loss_fn, epoch, runtime=runtime, quiet=quiet,
                                   description=f"train {epoch}/{cfg.epochs}", scheduler=scheduler)
        except TrainingDiverged as err:
            raise TrainingDiverged(err.value, epoch, err.step, len(train_b), ckpt_path, epoch - 1) from None
        acc1 = evaluate(model, test_b, runtime, total=test.num_images)
        record = {"epoch": epoch, "loss": loss, "acc1": acc1}
        history.append(record)
        if is_better(record, best, cfg.keep):
            best, best_epoch = record, epoch
            best_state = cpu_state(model) if cfg.keep != "last" else None
        save(epoch)
        say(f"epoch {epoch}/{cfg.epochs}: loss {loss:.4f}, acc@1 {acc1:.2f}% (kept: epoch {best_epoch})")
        if on_epoch is not None:
            on_epoch(epoch, record)

    if cfg.epochs == 0 or not history:
        acc1 = evaluate(model, test_b, runtime, total=test.num_images)
    else:
        if best_state is not None and best_epoch != history[-1]["epoch"]:
            model.load_state_dict(best_state)
        acc1 = best["acc1"] if best is not None else history[-1]["acc1"]
    model.train()
    wall = wall_before + time.perf_counter() - started
    return {"acc1": acc1, "best_epoch": best_epoch, "epochs": history, "wall_s": round(wall, 3)}

