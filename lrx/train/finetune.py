"""Fine-tuning an expanded model: data reconstruction (L2), cross-entropy (CE), distillation (KD), or together.

The teacher is the original model, frozen, in eval mode, run under ``torch.inference_mode``; the
student is the expanded model whose modules named ``layer_names`` replaced the teacher's modules of
the same names. Forward hooks (:class:`LayerTaps`) read those modules' outputs in both models, so no
model code is copied. Each batch is prepared once and fed to both models.

Loss of a stage with weights ``l2``, ``ce`` and ``kd`` (temperature T)::

    l2 * sum_layers mean_batch || student_layer(x) - teacher_layer(x) ||_2^2  +  ce * cross_entropy
      +  kd * T^2 * mean_batch KL(softmax(teacher(x) / T) || softmax(student(x) / T))

the last being Hinton, Vinyals and Dean's distillation ("Distilling the Knowledge in a Neural Network", 2015;
T^2 keeps its gradients' scale as T changes). With ``ce == kd == 0`` (the seed's L2 fine-tune) only the
replaced layers train: every other parameter has ``requires_grad=False`` and the rest of the student stays
in eval mode (dropout off).

Given validation images, a stage chooses its kept epoch on them among the model it was given (epoch 0) and
its epochs, so it never hands on a model worse on them than its input; the test images are evaluated on the
kept model only.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lrx.base import distributed
from lrx.config.settings import RuntimeConfig, StageConfig, stage_settings
from lrx.base.errors import UserError
from lrx.measure.accuracy import pack
from lrx.train.loop import (LossFn, autocast, batches_device, correct_per_image, fit, for_model, kept_modes, main_log,
                            prepare_model, resume, start_device, to_memory_format, whole_correct)
from lrx.train.baseline import adamw, selection

__all__ = ["LayerTaps", "squared_distances", "measure", "l2_norm", "freeze_for_stage", "set_stage_modes",
           "stage_label", "run_stage", "distillation", "stage_loss"]

Log = Callable[[str], None]


class _Stop(Exception):
    """Raised by a hook to end a forward pass whose remaining layers nobody needs."""


class LayerTaps:
    """Forward hooks that keep the outputs of the named modules of one model.

    ``taps(model, x)`` runs the model and returns its output; ``taps.outputs[name]`` is then the
    output of module ``name`` for that batch. The hook hands the rest of the model a copy of the
    output, so an in-place operation that follows (``ReLU(inplace=True)``) cannot change the kept
    tensor: the kept value is the module's own output, before any activation.

    With ``stop_early=True`` the forward pass ends right after the last tapped module (known after
    the first full pass) and ``taps(model, x)`` returns None: the layers after it are not run.
    Use as a context manager, or call :meth:`remove`, to take the hooks off.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], stop_early: bool = False):
        model = distributed.unwrap(model)
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules or not n]
        if missing:
            convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)][:12]
            raise UserError(f"the model has no module named {', '.join(map(repr, missing))}; "
                            f"its convolutions include: {', '.join(convs) or 'none'}", key="layers")
        self.stop_early = stop_early
        self.outputs: dict[str, torch.Tensor] = {}
        self._last: str | None = None  # the tapped module that runs last; None until a full pass showed it
        self._calls: list[str] = []
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise UserError(f"module {name!r} returns {type(output).__name__}, not a tensor; "
                                "only modules with one tensor output can be compared", key="layers")
            self.outputs[name] = output
            self._calls.append(name)
            if self.stop_early and name == self._last:
                raise _Stop
            return output.clone()

        return hook

    def __call__(self, model: nn.Module, x: torch.Tensor):
        self.outputs, self._calls = {}, []
        try:
            out = model(x)
        except _Stop:
            return None
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise UserError(f"modules {', '.join(missing)} did not run in the forward pass", key="layers")
        if self._last is None and len(self._calls) == len(set(self._calls)):
            self._last = self._calls[-1]  # a module run twice per pass keeps the full forward
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "LayerTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def squared_distances(student: dict, teacher: dict, names: list[str]) -> torch.Tensor:
    """Per-sample squared L2 distances, (len(names), B), in float32, between the two models' outputs."""
    rows = []
    for name in names:
        s, t = student[name], teacher[name]
        if s.shape != t.shape:
            raise UserError(f"layer {name!r}: the student's output has shape {tuple(s.shape)} but the teacher's "
                            f"has {tuple(t.shape)}; a replaced layer must keep its output shape", key="layers")
        rows.append((s.float() - t.float()).square().flatten(1).sum(1))
    return torch.stack(rows)


# ---------------------------------------------------------------- measuring


@torch.inference_mode()
def measure(student: nn.Module, teacher: nn.Module, layer_names: Iterable[str], batches,
            runtime: RuntimeConfig | None = None, total: int | None = None, accuracy: bool = True,
            per_image: list | None = None) -> tuple[float | None, float]:
    """Acc@1 (percent) of the student and its L2 norm to the teacher, in one pass over ``batches``.

    The L2 norm: per-sample L2 norm of each named layer's output difference, averaged over the
    images, summed over the layers (the seed's "L2 norm"). Both models in eval mode (flags restored
    after). Under DDP pass this rank's shard and ``total``, the unsharded number of images.
    ``per_image`` (with ``accuracy``): a list that receives the student's per-image correctness, bool (N,) on
    the CPU in the batches' order (:func:`lrx.train.loop.whole_correct`), from the same pass.
    Returns ``(acc1 or None when accuracy=False, l2)``.
    """
    names = list(layer_names)
    student, teacher = distributed.unwrap(student), distributed.unwrap(teacher)
    batches = for_model(batches, student)
    device = batches_device(batches)
    limit = distributed.own_count(total) if total is not None else None
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, images, sum of per-image L2 norms
    rights = []
    with kept_modes(student), kept_modes(teacher), LayerTaps(teacher, names, stop_early=True) as t_taps, \
            LayerTaps(student, names, stop_early=not accuracy) as s_taps:
        student.eval()
        teacher.eval()
        seen = 0
        for x, y in batches:
            if limit is not None and seen + len(y) > limit:
                x, y = x[: limit - seen], y[: limit - seen]
            if len(y) == 0:
                break
            x = to_memory_format(x, runtime)
            with autocast(runtime, device):
                t_taps(teacher, x)
                logits = s_taps(student, x)
            sums[2] += squared_distances(s_taps.outputs, t_taps.outputs, names).sqrt().sum(0).sum()
            if accuracy:
                right = logits.argmax(1) == y
                sums[0] += right.sum()
                rights.append(right)
            sums[1] += len(y)
            seen += len(y)
    distributed.all_reduce_sum(sums)
    if sums[1] == 0:
        raise UserError("no test images to evaluate on", key="data")
    if per_image is not None and accuracy:
        per_image.append(whole_correct(rights, total))
    acc1 = float(100.0 * sums[0] / sums[1]) if accuracy else None
    return acc1, float(sums[2] / sums[1])


def l2_norm(student: nn.Module, teacher: nn.Module, layer_names: Iterable[str], batches,
            runtime: RuntimeConfig | None = None) -> float:
    """The seed's "L2 norm": per-sample L2 norm of each replaced layer's output difference
    (student vs teacher, same image), averaged over the images of ``batches``, summed over the layers."""
    return measure(student, teacher, layer_names, batches, runtime, accuracy=False)[1]


# ---------------------------------------------------------------- one stage


def freeze_for_stage(student: nn.Module, names: list[str], pure_l2: bool) -> list[nn.Parameter]:
    """Set requires_grad for the stage; returns the trainable parameters in module order."""
    modules = dict(student.named_modules())
    if pure_l2:
        student.requires_grad_(False)
        for name in names:
            modules[name].requires_grad_(True)
    else:
        student.requires_grad_(True)
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise UserError(f"the layers {', '.join(names)} have no parameters to train", key="layers")
    return trainable


def set_stage_modes(student: nn.Module, names: list[str], pure_l2: bool) -> None:
    """Train mode for what trains: the replaced modules only in a pure L2 stage, else everything."""
    if pure_l2:
        student.eval()
        modules = dict(student.named_modules())
        for name in names:
            modules[name].train()
    else:
        student.train()


def stage_label(stage: StageConfig) -> str:
    parts = [f"{key} {getattr(stage, key):g}" for key in ("l2", "ce", "kd") if getattr(stage, key) > 0]
    if stage.kd > 0:
        parts[-1] += f" (T {stage.temperature:g})"
    return " + ".join(parts) or "no loss"


def run_stage(student: nn.Module, teacher: nn.Module, layer_names: Iterable[str], train, test, stage: StageConfig,
              ckpt_path, log: Log | None = None, quiet: bool = False, runtime: RuntimeConfig | None = None,
              seed: int = 0, on_epoch: Callable[[int, dict], None] | None = None, val=None,
              before_test: dict | None = None) -> dict:
    """Fine-tune ``student`` for ``stage.epochs`` epochs; resume from ``ckpt_path`` if it exists.

    Parameters
    ----------
    student : the expanded model; modules ``layer_names`` replaced the teacher's modules of the same
        names and give outputs of the same shapes. Trained in place; on return it holds the kept
        epoch's weights (``stage.keep``: best-acc, best-l2 or last) and every parameter has
        ``requires_grad=True`` again.
    teacher : the original model; never changed.
    train, test : :class:`lrx.data.datasets.Batches` or :class:`lrx.data.datasets.StreamBatches` (unsharded; each process takes
        its shard under DDP), giving float32 (B, 3, S, S) images and int64 (B,) labels on the device to train
        on; or any iterable of (images, labels) batches that can be iterated again (a DataLoader, a list),
        moved to the student's device batch by batch (under DDP: this process's share, e.g. with a
        DistributedSampler, whose ``set_epoch`` is called).
    stage : loss weights ``l2``/``ce``, ``epochs``, AdamW's ``lr``, ``betas``, ``weight_decay``, ``keep``.
    val : batches of validation images (as ``test``), disjoint from ``train``: the student as given (epoch
        0) and after every epoch is measured on them, and the kept one is chosen among all of these (ties
        keep the earlier); the test images are measured on the input and on the kept model only. None: every
        epoch is measured on ``test`` and the kept one chosen among epochs 1..n on it (lrx's earlier rule).
    before_test : ``{"acc1", "l2"}`` of the student as given on ``test``, when the caller measured them already
        (the previous stage's kept model on the same images); None: measured here (with ``val``).
    ckpt_path : the per-epoch checkpoint ``{model, optimizer, scheduler (None), epoch, best, best_epoch, history,
        before, rng, settings, wall_s}``, written atomically by rank 0 after every epoch (and as epoch 0
        before training).
    log : receives one line per epoch (rank 0 only).
    seed : seeds dropout; the data order comes from the batches' own seed and the epoch.
    on_epoch : called as ``on_epoch(epoch, record)`` after each epoch's checkpoint is written.

    Returns
    -------
    ``{"l2", "ce", "epochs", "acc1_before", "acc1_after", "l2_before", "l2_after", "best_epoch",
    "history": [{"epoch", "loss", "acc1", "l2"}], "wall_s", "selected_on", "kept_input", "test_correct"}``:
    ``*_before`` / ``*_after`` on the test images, the history on the images the epochs were chosen on
    (``selected_on``: "validation", "test", or None when nothing was chosen); with ``val`` also
    ``validation``: ``{"acc1_before", "acc1_after", "l2_before", "l2_after"}`` on them; with ``kd`` also ``kd``
    and ``temperature``. ``best_epoch`` is 0
    when no epoch ran or the input was kept (``kept_input``: it was, over every epoch); ``test_correct``:
    the kept model's per-image correctness on the test images (:func:`lrx.measure.accuracy.pack`).

    Raises
    ------
    TrainingDiverged
        when the loss becomes NaN or infinite (naming epoch and step); the checkpoint of the last
        finished epoch is kept on disk.
    """
    started = time.perf_counter()
    runtime = runtime or RuntimeConfig()
    names = list(layer_names)
    if not names:
        raise UserError("fine-tuning needs the names of the replaced layers; got none", key="layers")
    if teacher is None:
        raise UserError(f"fine-tuning ({stage_label(stage)}) needs the original model as its teacher: the L2 norm and "
                        "kd compare with it, and it is the reference of every stage; got none", key="teacher")
    train, test = for_model(train, student), for_model(test, student)
    device = start_device(train)
    say = main_log(log)
    ckpt_path = Path(ckpt_path)
    pure_l2 = stage.ce == 0 and stage.kd == 0  # only the replaced layers train
    prepare_model(student, device, runtime)
    prepare_model(teacher, device, runtime)
    teacher.eval()
    settings = {"kind": "finetune", "stage": stage_settings(stage), "layers": names, "seed": seed}
    if val is not None:  # a checkpoint chosen on the test images is not resumed as one chosen on validation
        settings["selected_on"] = "validation"
    chooser = for_model(val, student) if val is not None else test
    train_b, test_b, chooser_b = distributed.shard(train), distributed.shard(test), distributed.shard(chooser)
    label = stage_label(stage)

    def measured(batches, total) -> dict:
        acc1, l2 = measure(student, teacher, names, batches, runtime, total=total)
        return {"acc1": acc1, "l2": l2}

    def evaluate_epoch() -> dict:
        return measured(chooser_b, chooser.num_images)

    with kept_modes(student):
        try:
            trainable = freeze_for_stage(student, names, pure_l2)
            optimizer = adamw(trainable, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
            net = distributed.wrap(student, device)
            torch.manual_seed(seed + distributed.rank())

            state = resume(ckpt_path, settings, student, optimizer)
            if not state.resumed:  # only when fresh: a resumed run reads them back
                state.extra["before"] = before = evaluate_epoch()
                on = " on the validation images" if val is not None else ""
                say(f"fine-tune ({label}) for {stage.epochs} epochs: before, acc@1{on} {before['acc1']:.2f}%, "
                    f"L2 norm {before['l2']:.4g}")
                if val is not None:
                    state.extra["before_test"] = dict(before_test) if before_test else measured(test_b, test.num_images)
            elif state.next_epoch <= stage.epochs:
                say(f"resuming fine-tune ({label}) from epoch {state.next_epoch} of {stage.epochs} ({ckpt_path})")
            if val is not None:
                state.initial = state.extra["before"]  # the input competes as epoch 0
            # DDP needs whole forward passes; one process may stop the student after the last replaced layer.
            student_stops = pure_l2 and not distributed.is_distributed()
            fit(net, train_b, optimizer, state, stage.epochs, keep=stage.keep, evaluate_epoch=evaluate_epoch,
                epoch_loss=lambda: _epoch_loss(teacher, student, names, stage, student_stops),
                set_modes=lambda: set_stage_modes(student, names, pure_l2), ckpt_path=ckpt_path, settings=settings,
                started=started, runtime=runtime, label=label, quiet=quiet, say=say, on_epoch=on_epoch,
                split="validation" if val is not None else None)
        finally:
            student.requires_grad_(True)

    before = state.extra["before"]
    kept = state.best if state.best is not None else before
    if val is None:  # chosen on the test images: the kept epoch's figures are the test figures
        before_test, after_test = before, kept
        correct = correct_per_image(student, test_b, runtime, total=test.num_images)  # the kept model, once
    else:  # the kept model on the test images, once: acc@1, L2 norm and per-image correctness in one pass
        bits: list = []
        acc1, l2 = measure(student, teacher, names, test_b, runtime, total=test.num_images, per_image=bits)
        before_test, after_test, correct = state.extra["before_test"], {"acc1": acc1, "l2": l2}, bits[0]
    kept_input = bool(state.history) and state.best_epoch == 0 and val is not None and stage.keep != "last"
    if kept_input:
        say(f"kept the model the stage started from: no epoch beat it on the validation images "
            f"(acc@1 {before['acc1']:.2f}%, L2 norm {before['l2']:.4g})")
    result = {"l2": stage.l2, "ce": stage.ce, "epochs": stage.epochs,
              "acc1_before": before_test["acc1"], "acc1_after": after_test["acc1"],
              "l2_before": before_test["l2"], "l2_after": after_test["l2"], "best_epoch": state.best_epoch,
              "history": state.history, "wall_s": round(state.wall(started), 3),
              "selected_on": selection(val, len(state.history), stage.keep), "kept_input": kept_input,
              "test_correct": pack(correct.numpy())}
    if stage.kd > 0:
        result.update(kd=stage.kd, temperature=stage.temperature)
    if val is not None:
        result["validation"] = {"acc1_before": before["acc1"], "acc1_after": kept["acc1"],
                                "l2_before": before["l2"], "l2_after": kept["l2"]}
    return result


@contextlib.contextmanager
def _epoch_loss(teacher: nn.Module, student: nn.Module, names: list[str], stage: StageConfig,
                student_stops: bool) -> Iterator[LossFn]:
    """The taps for one epoch and the stage's loss over them; :func:`measure` sets its own on the same modules."""
    with LayerTaps(teacher, names, stop_early=stage.kd == 0) as t_taps, \
            LayerTaps(student, names, stop_early=student_stops) as s_taps:
        yield stage_loss(teacher, names, stage, t_taps, s_taps)


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(softmax(teacher / T) || softmax(student / T)), logits (B, classes)."""
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"kd compares logits: the student gives {tuple(student_logits.shape)}, the original "
                        f"{tuple(teacher_logits.shape)}; both need the same classes", key="kd")
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    log_target=True, reduction="batchmean") * t * t


def stage_loss(teacher: nn.Module, names: list[str], stage: StageConfig, t_taps: LayerTaps, s_taps: LayerTaps):
    """The stage's ``loss_fn(model, x, y)``: weighted L2 reconstruction, cross-entropy and distillation."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        teacher_logits = None
        if stage.l2 > 0 or stage.kd > 0:
            with torch.inference_mode():
                teacher_logits = t_taps(teacher, x)  # the whole forward with kd (its taps do not stop early)
            if teacher_logits is not None:
                teacher_logits = teacher_logits.clone()  # out of inference mode, to enter the loss
        logits = s_taps(model, x)
        loss = torch.zeros((), device=x.device)
        if stage.l2 > 0:
            loss = loss + stage.l2 * squared_distances(s_taps.outputs, t_taps.outputs, names).mean(1).sum()
        if stage.ce > 0:
            loss = loss + stage.ce * F.cross_entropy(logits.float(), y)
        if stage.kd > 0:
            loss = loss + stage.kd * distillation(logits, teacher_logits, stage.temperature)
        return loss

    return loss_fn
