"""The epoch loop that baseline training and fine-tuning share, after torchvision's ``train_one_epoch``.

``train_one_epoch`` runs one pass with any loss and ``evaluate`` returns acc@1. :func:`fit` runs the
epochs ``state.next_epoch..epochs``: a checkpoint after every epoch (and as epoch 0 before the first),
the keep rule (:func:`is_better`; the model it started from competes as epoch 0 when ``state.initial`` holds
its record), the NaN stop and the kept weights restored at the end. What differs
between :mod:`lrx.train.baseline` and :mod:`lrx.train.finetune` (the loss, what trains, how an epoch is evaluated,
the scheduler, extra checkpoint keys) comes in as hooks. :func:`resume` reads a checkpoint back into a
:class:`LoopState`. :func:`correct_per_image` says which test images a kept model classifies correctly (for the
intervals of :mod:`lrx.measure.accuracy`). This module sits below both callers and imports neither.
It is long because it is the one loop: every piece both callers share (runtime, one epoch, evaluation, the
keep rule, checkpoints and resume) lives here, so that they cannot drift apart.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from lrx.base import distributed
from lrx.base.files import load_checkpoint, save_atomic
from lrx.config.settings import RuntimeConfig
from lrx.data.datasets import as_batches, length
from lrx.base.errors import TrainingDiverged, UserError
from lrx.base.progress import progress

__all__ = ["CHECK_EVERY", "LOOP_KEYS", "autocast", "to_memory_format", "prepare_model", "batches_device",
           "model_device", "for_model", "start_device", "main_log", "kept_modes", "rng_state", "set_rng_state",
           "all_rng_states", "restore_rng_states", "cpu_state", "train_one_epoch", "evaluate", "correct_per_image",
           "whole_correct", "is_better",
           "LoopState", "load_weights", "check_settings", "resume", "epoch_line", "fit"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Log = Callable[[str], None]

# Loss values stay on the device and are checked for NaN/inf every this many steps: a host sync
# per step would stall a GPU; the check still names the first bad step exactly.
CHECK_EVERY = 20

# The keys :func:`fit` writes into every checkpoint; any other key is a caller's extra (``before``).
LOOP_KEYS = ("model", "optimizer", "scheduler", "epoch", "best", "best_epoch", "history", "rng", "settings", "wall_s")


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


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (else buffer) lives; the CPU for a model without either."""
    for tensor in (*distributed.unwrap(model).parameters(), *distributed.unwrap(model).buffers()):
        return tensor.device
    return torch.device("cpu")


def for_model(batches, model: nn.Module):
    """``batches`` as the loops use them: lrx's own as they are; any other iterable of (images, labels)
    (a DataLoader, a list) wrapped to deliver each batch on ``model``'s device (:func:`lrx.data.datasets.as_batches`)."""
    return as_batches(batches, model_device(model))


def start_device(batches) -> torch.device:
    """Join the process group when run under torchrun; returns the device this process trains on."""
    distributed.setup(batches_device(batches))
    return batches_device(batches)  # under torchrun ``cuda`` now names this rank's GPU


def main_log(log: Log | None) -> Log:
    """``log`` on rank 0; a no-op elsewhere or when there is none."""
    return log if (log is not None and distributed.is_main()) else (lambda message: None)


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


# ---------------------------------------------------------------- one epoch


def train_one_epoch(model: nn.Module, batches, optimizer: torch.optim.Optimizer, loss_fn: LossFn, epoch: int, *,
                    runtime: RuntimeConfig | None = None, description: str = "train", quiet: bool = True,
                    scheduler=None) -> float:
    """One pass over ``batches`` (reshuffled with ``batches.set_epoch(epoch)``).

    Parameters
    ----------
    model : the model the optimizer updates (it may be wrapped in DistributedDataParallel); its
        train/eval flags are the caller's choice and are left alone.
    batches : yields (x float32 (B, 3, S, S), y int64 (B,)): :class:`lrx.data.datasets.Batches`, or any iterable
        of such batches (a DataLoader, a list), moved to the model's device.
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
    batches = for_model(batches, model)
    device = batches_device(batches)
    batches.set_epoch(epoch)
    steps = length(batches)  # None: an iterable that does not say
    total = torch.zeros((), dtype=torch.float64, device=device)
    pending: list[torch.Tensor] = []
    done = 0

    def check(bar) -> None:
        nonlocal total, done, pending
        values = torch.stack(pending)
        finite = torch.isfinite(values)
        if distributed.any_true(not bool(finite.all()), device):
            bad = (~finite).nonzero()
            first = int(bad[0]) if len(bad) else len(pending) - 1  # another rank diverged
            raise TrainingDiverged(float(values[first]), epoch, done + first + 1, steps or done + len(pending))
        total += values.double().sum()
        done += len(pending)
        pending = []
        bar.advance(0, loss=float(total) / done)

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
                check(bar)
            bar.advance()
        if pending:  # the last steps of an iterable without a length
            check(bar)
    if done == 0:
        raise UserError("no training batches: the training split is empty or smaller than one batch", key="data")
    stats = distributed.all_reduce_sum(torch.stack([total, torch.tensor(float(done), dtype=torch.float64, device=device)]))
    return float(stats[0] / stats[1])


def _top1_right(model: nn.Module, batches, device, runtime: RuntimeConfig | None, total: int | None):
    """Per batch, whether ``model``'s top-1 class is right for each image (bool, on ``device``), in eval mode
    with the model's flags restored after; under DDP this rank's images up to its share of ``total``."""
    limit = distributed.own_count(total) if total is not None else None
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
            seen += len(y)
            yield logits.argmax(1) == y


@torch.inference_mode()
def evaluate(model: nn.Module, batches, runtime: RuntimeConfig | None = None, total: int | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` on ``batches`` (eval mode; flags restored after).

    ``batches``: lrx's :class:`lrx.data.datasets.Batches`, or any iterable of (images, labels) batches that can be
    iterated again (a DataLoader, a list), moved to the model's device. Under DDP pass this rank's shard
    and ``total``, the unsharded number of images: the padding a shard repeats is not counted, so the
    result equals a single process's.
    """
    model = distributed.unwrap(model)
    batches = for_model(batches, model)
    device = batches_device(batches)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for right in _top1_right(model, batches, device, runtime, total):
        correct += right.sum()
        seen += len(right)
    stats = distributed.all_reduce_sum(torch.stack([correct, torch.tensor(float(seen), dtype=torch.float64, device=device)]))
    if stats[1] == 0:
        raise UserError("no test images to evaluate on", key="data")
    return float(100.0 * stats[0] / stats[1])


@torch.inference_mode()
def correct_per_image(model: nn.Module, batches, runtime: RuntimeConfig | None = None,
                      total: int | None = None) -> torch.Tensor:
    """Whether ``model``'s top-1 class is right, per image of ``batches``: bool (N,) on the CPU, in the split's
    order (eval mode; flags restored after).

    Under DDP pass this rank's shard of unshuffled batches and ``total``, the unsharded number of images:
    every process gets the whole vector, each rank's strided share put back in its place (the padding a shard
    repeats left out). Without ``total`` the vector is this process's own images.
    """
    model = distributed.unwrap(model)
    batches = for_model(batches, model)
    return whole_correct(list(_top1_right(model, batches, batches_device(batches), runtime, total)), total)


def whole_correct(parts: list[torch.Tensor], total: int | None) -> torch.Tensor:
    """bool (N,) on the CPU from this process's per-batch correctness ``parts`` (its strided share of
    unshuffled batches under DDP): every process gets the whole vector when ``total`` (the unsharded number
    of images) is given, else this process's own images."""
    mine = torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.bool)
    if total is None:
        return mine
    shares = distributed.gather(mine)
    if len(shares) == 1:
        return shares[0]
    whole = torch.zeros(total, dtype=torch.bool)
    for rank, share in enumerate(shares):
        whole[rank::len(shares)] = share
    return whole


# ---------------------------------------------------------------- keep rule and resume


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


@dataclasses.dataclass
class LoopState:
    """Where the epoch loop stands: what :func:`resume` reads from a checkpoint and :func:`fit` advances.

    Attributes
    ----------
    history : one record ``{"epoch", "loss", "acc1", ...}`` per finished epoch.
    best_epoch : the kept epoch; 0 before any, or the model the loop started from (see ``initial``).
    best_state : the kept epoch's weights on the CPU, or None when the model holds them (the kept
        epoch is the latest, or ``keep="last"``).
    wall_s : seconds spent by earlier sessions on this checkpoint.
    next_epoch : the first epoch to run.
    extra : the caller's own checkpoint keys (fine-tuning's ``before``), written into every checkpoint.
    resumed : whether the state came from a checkpoint on disk.
    initial : the record ``{"acc1", ...}`` of the model the loop starts from, when it competes as epoch 0
        (a fine-tuning stage that never hands on a model worse than its input); None: it does not.
    """

    history: list = dataclasses.field(default_factory=list)
    best_epoch: int = 0
    best_state: dict | None = None
    wall_s: float = 0.0
    next_epoch: int = 1
    extra: dict = dataclasses.field(default_factory=dict)
    resumed: bool = False
    initial: dict | None = None

    @property
    def best(self) -> dict | None:
        """The kept epoch's record (``initial`` for epoch 0), or None before any epoch."""
        if self.best_epoch == 0:
            return self.initial
        return next((r for r in self.history if r["epoch"] == self.best_epoch), None)

    def wall(self, started: float) -> float:
        """Seconds of every session so far, this one counted from ``started`` (``time.perf_counter()``)."""
        return self.wall_s + time.perf_counter() - started


def load_weights(model: nn.Module, state: dict, path) -> None:
    """``model.load_state_dict(state)`` with a one-line error naming the checkpoint when they do not fit."""
    try:
        distributed.unwrap(model).load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        first = " ".join(str(err).split())[:400]  # room for both shapes of a size mismatch
        raise UserError(f"the checkpoint does not fit the model ({first}); delete it to start over", file=str(path)) from None


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


def resume(ckpt_path, settings: dict, model: nn.Module, optimizer, scheduler=None) -> LoopState:
    """The loop state to start from: fresh, or restored from the per-epoch checkpoint at ``ckpt_path``.

    Restores the weights, the optimizer (and scheduler) and every rank's RNG state from the checkpoint;
    the checkpoint's keys other than :data:`LOOP_KEYS` come back in ``extra``.
    """
    if not distributed.file_exists(ckpt_path):
        return LoopState()
    ckpt = load_checkpoint(ckpt_path)
    check_settings(ckpt, settings, ckpt_path)
    load_weights(model, ckpt["model"], ckpt_path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    best_epoch = ckpt["best_epoch"]
    # "best" is None when the checkpoint's own weights are the kept ones (or nothing is kept yet).
    best_state = ckpt["best"] if ckpt["best"] is not None else (cpu_state(model) if best_epoch else None)
    restore_rng_states(ckpt["rng"])
    return LoopState(history=list(ckpt["history"]), best_epoch=best_epoch, best_state=best_state,
                     wall_s=ckpt["wall_s"], next_epoch=ckpt["epoch"] + 1,
                     extra={k: v for k, v in ckpt.items() if k not in LOOP_KEYS}, resumed=True)


# ---------------------------------------------------------------- the loop


def epoch_line(record: dict, epochs: int, best_epoch: int, split: str | None = None) -> str:
    """The log line of one epoch: loss, acc@1 (on ``split`` when named), the L2 norm when measured, and the
    kept epoch (0: the model the loop started from)."""
    l2 = f", L2 norm {record['l2']:.4g}" if "l2" in record else ""
    on = f" ({split})" if split else ""
    kept = "the starting model" if best_epoch == 0 else f"epoch {best_epoch}"
    return (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4g}, acc@1{on} {record['acc1']:.2f}%{l2} "
            f"(kept: {kept})")


def fit(model: nn.Module, batches, optimizer: torch.optim.Optimizer, state: LoopState, epochs: int, *,
        epoch_loss: Callable[[], ContextManager[LossFn]], evaluate_epoch: Callable[[], dict], keep: str,
        ckpt_path, settings: dict, started: float, set_modes: Callable[[], None] | None = None, scheduler=None,
        runtime: RuntimeConfig | None = None, label: str = "train", quiet: bool = True, say: Log | None = None,
        on_epoch: Callable[[int, dict], None] | None = None, split: str | None = None) -> LoopState:
    """Run epochs ``state.next_epoch..epochs``; on return the model holds the kept epoch's weights.

    A checkpoint ``{model, optimizer, scheduler, epoch, best, best_epoch, history, rng, settings, wall_s,
    **state.extra}`` is written by rank 0 after every epoch, and as epoch 0 when starting at epoch 1.

    Parameters
    ----------
    model : what the optimizer updates (it may be wrapped in DistributedDataParallel).
    batches : this rank's shard of the training batches.
    state : from :func:`resume`; advanced in place and returned.
    epoch_loss : ``epoch_loss()`` opens a context that yields the epoch's ``loss_fn(model, x, y)`` (the
        fine-tuning hooks live for one epoch).
    evaluate_epoch : ``evaluate_epoch() -> {"acc1", ...}``, the metrics of the epoch's record, measured on the
        images that choose the kept epoch (``split`` names them in the log).
    keep : the rule of :func:`is_better`; with ``state.initial`` set the starting model is epoch 0's
        candidate (kept unless an epoch beats it; ``last`` ignores it).
    started : ``time.perf_counter()`` when this session began (for ``wall_s``).
    set_modes : sets the train/eval flags before each epoch; default ``model.train()``.
    scheduler : stepped once per batch, and saved.
    label : names the epoch in the progress bar.
    say : receives one line per epoch (pass :func:`main_log`'s).
    on_epoch : called as ``on_epoch(epoch, record)`` after each epoch's checkpoint is written.

    Raises
    ------
    TrainingDiverged
        naming the epoch, the step and ``ckpt_path``, which still holds the last finished epoch.
    """
    net, plain = model, distributed.unwrap(model)
    say = say or (lambda message: None)
    ckpt_path = Path(ckpt_path)

    def save(epoch: int) -> None:
        rng = all_rng_states()  # collective: every rank takes part
        if distributed.is_main():
            save_atomic({"model": plain.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict() if scheduler is not None else None, "epoch": epoch,
                   "best": None if state.best_epoch == epoch else state.best_state, "best_epoch": state.best_epoch,
                   "history": state.history, "rng": rng, "settings": settings, "wall_s": state.wall(started),
                   **state.extra}, ckpt_path)

    if state.initial is not None and keep != "last" and state.best_epoch == 0 and state.best_state is None:
        state.best_state = cpu_state(plain)  # the starting weights, epoch 0's candidate (before any epoch ran)
    if state.next_epoch == 1:
        save(0)
    for epoch in range(state.next_epoch, epochs + 1):
        if set_modes is not None:
            set_modes()
        else:
            plain.train()
        with epoch_loss() as loss_fn:
            try:
                loss = train_one_epoch(net, batches, optimizer, loss_fn, epoch, runtime=runtime, quiet=quiet,
                                       description=f"{label} {epoch}/{epochs}", scheduler=scheduler)
            except TrainingDiverged as err:
                steps = length(batches) or err.step
                raise TrainingDiverged(err.value, epoch, err.step, steps, ckpt_path, epoch - 1) from None
        record = {"epoch": epoch, "loss": loss, **evaluate_epoch()}
        state.history.append(record)
        if is_better(record, state.best, keep):
            state.best_epoch = epoch
            state.best_state = cpu_state(plain) if keep != "last" else None
        state.next_epoch = epoch + 1
        save(epoch)
        say(epoch_line(record, epochs, state.best_epoch, split))
        if on_epoch is not None:
            on_epoch(epoch, record)
    if state.history and state.best_state is not None and state.best_epoch != state.history[-1]["epoch"]:
        plain.load_state_dict(state.best_state)
    return state
