"""Baseline training: evaluate, the NaN check, the kept epoch, resume equals uninterrupted."""
import math

import pytest
import torch
from torch import nn

from lrx.train import baseline as train_mod
from lrx.base.files import load_checkpoint
from lrx.config.settings import TrainConfig
from lrx.data.datasets import Batches, synthetic
from lrx.base.errors import UserError
from lrx.measure.accuracy import unpack
from lrx.train.baseline import TrainingDiverged, evaluate, train_baseline, train_one_epoch


pytestmark = pytest.mark.usefixtures("one_thread")


class Scaled(nn.Module):
    """A small CNN whose logits are multiplied by ``scale`` (set it to NaN to make the loss diverge)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, 10))
        self.scale = 1.0

    def forward(self, x):
        return self.body(x) * self.scale


def make_data(n_train=256, n_test=128, size=16):
    x, y = synthetic(n_train, size, seed=0)
    xt, yt = synthetic(n_test, size, seed=1)
    return (Batches(x, y, 32, size, "cpu", shuffle=True, seed=0),
            Batches(xt, yt, 50, size, "cpu", shuffle=False, seed=0))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Constant(nn.Module):
    """Always predicts class ``c``."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        out[:, self.c] = 1.0
        return out + self.dummy


def test_evaluate_is_percent_correct_and_restores_the_mode():
    _, test = make_data(n_test=130)
    expected = 100.0 * (test.labels == 3).sum().item() / 130
    model = Constant(3)
    model.train()
    got = evaluate(model, test)
    assert abs(got - expected) < 1e-9, f"acc@1 {got}, expected {expected} (share of label 3 in percent)"
    assert model.training, "evaluate must restore the train/eval flags it found"


def test_evaluate_of_padded_shards_counts_each_image_once(monkeypatch):
    _, test = make_data(n_test=101)  # 101 images over 2 ranks: the shards repeat one image as padding
    model = Constant(3)
    whole = evaluate(model, test)
    sums = []
    dist = train_mod.distributed
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: sums.append(t.clone()) or t)  # collect instead of reducing
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=rank: r)
        shard = test.shard(rank, 2)
        assert shard.num_images == 51, "test setup: each shard holds 51 images, one of them padding"
        evaluate(model, shard, total=test.num_images)
    correct, seen = sum(sums).tolist()
    assert seen == 101, f"the two ranks together counted {seen} images, expected 101 (padding excluded)"
    assert 100.0 * correct / seen == pytest.approx(whole), "sharded accuracy differs from one process's"


def batches_of(values):
    """A stand-in for Batches: one (x, y) per value, x a (1, 1) tensor holding the value."""

    class Fake(list):
        def set_epoch(self, epoch):
            self.epoch = epoch

    return Fake((torch.tensor([[v]]), torch.tensor([0])) for v in values)


def value_loss(model, x, y):
    """The batch's value as the loss, with a gradient path to the model."""
    return (model.weight * 0).sum() + x.sum()


def test_nan_is_found_at_its_step_past_the_first_check():
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    values = [1.0] * 24 + [float("nan")] + [1.0] * 10  # step 25 lies in the second group of checks
    with pytest.raises(TrainingDiverged) as err:
        train_one_epoch(model, batches_of(values), optimizer, value_loss, epoch=7)
    assert (err.value.epoch, err.value.step) == (7, 25), f"reported epoch {err.value.epoch} step {err.value.step}"
    assert "epoch 7, step 25 of 35" in str(err.value), f"message: {err.value}"


def test_infinite_loss_stops_too():
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(TrainingDiverged, match="inf at epoch 1, step 2"):
        train_one_epoch(model, batches_of([1.0, float("inf")]), optimizer, value_loss, epoch=1)


def test_mean_loss_of_an_epoch():
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    mean = train_one_epoch(model, batches_of([1.0, 2.0, 6.0]), optimizer, value_loss, epoch=1)
    assert mean == pytest.approx(3.0), f"mean loss {mean}, expected 3.0"


def test_baseline_learns_and_reports(tmp_path):
    model = Scaled()
    train, test = make_data()
    result = train_baseline(model, train, test, TrainConfig(epochs=3, lr=0.05), tmp_path / "t.ckpt", quiet=True)
    assert set(result) == {"acc1", "best_epoch", "epochs", "wall_s", "selected_on", "test_correct"}, \
        f"result keys {sorted(result)}"
    assert result["selected_on"] == "test", "without validation images the epoch is chosen on the test images"
    bits = unpack(result["test_correct"])
    assert len(bits) == 128 and 100 * bits.mean() == pytest.approx(result["acc1"]), "the kept model's per-image bits"
    assert [r["epoch"] for r in result["epochs"]] == [1, 2, 3], "one history record per epoch"
    assert result["epochs"][-1]["loss"] < result["epochs"][0]["loss"], f"the loss did not fall: {result['epochs']}"
    assert result["acc1"] > 30.0, f"3 epochs on learnable synthetic data should beat chance (10%): {result['acc1']}"
    assert result["acc1"] == max(r["acc1"] for r in result["epochs"]), "best-acc must report the best epoch's acc1"
    assert evaluate(model, test) == result["acc1"], "the model must hold the kept epoch's weights"


@pytest.mark.parametrize("keep, expected", [("best-acc", 2), ("last", 3)])
def test_kept_epoch(tmp_path, monkeypatch, keep, expected):
    model = Scaled()
    train, test = make_data(n_train=64)
    fake = iter([50.0, 90.0, 70.0])
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: next(fake))
    snapshots = {}
    result = train_baseline(model, train, test, TrainConfig(epochs=3, keep=keep), tmp_path / "t.ckpt", quiet=True,
                            on_epoch=lambda epoch, rec: snapshots.update({epoch: state(model)}))
    assert result["best_epoch"] == expected and result["acc1"] == [50.0, 90.0, 70.0][expected - 1], \
        f"keep {keep}: kept epoch {result['best_epoch']} with acc1 {result['acc1']}"
    assert all(torch.equal(v, snapshots[expected][k]) for k, v in state(model).items()), \
        f"the model does not hold epoch {expected}'s weights"


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    train, test = make_data()
    # SGD + warm-up and per-step cosine schedule + dropout: all three must resume exactly
    cfg = TrainConfig(epochs=4, lr=0.05, warmup_epochs=1.5)
    model = Scaled()
    whole = train_baseline(model, train, test, cfg, tmp_path / "whole.ckpt", quiet=True, seed=1)
    whole_state = state(model)

    def stop_after_2(epoch, record):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_baseline(Scaled(), train, test, cfg, tmp_path / "cut.ckpt", quiet=True, seed=1, on_epoch=stop_after_2)
    torch.manual_seed(999)
    model = Scaled(seed=5)  # weights come from the checkpoint, not from the fresh model
    resumed = train_baseline(model, train, test, cfg, tmp_path / "cut.ckpt", quiet=True, seed=1)
    assert resumed["epochs"] == whole["epochs"], f"history differs: {resumed['epochs']} vs {whole['epochs']}"
    assert (resumed["acc1"], resumed["best_epoch"]) == (whole["acc1"], whole["best_epoch"]), "final metrics differ"
    assert all(torch.equal(whole_state[k], v) for k, v in state(model).items()), "resumed weights differ"


def test_nan_keeps_the_last_good_checkpoint(tmp_path):
    model = Scaled()
    train, test = make_data()
    ckpt = tmp_path / "t.ckpt"
    good = {}

    def diverge_after_1(epoch, record):
        good.update(state(model))
        model.scale = float("nan")

    with pytest.raises(TrainingDiverged) as err:
        train_baseline(model, train, test, TrainConfig(epochs=3), ckpt, quiet=True, on_epoch=diverge_after_1)
    assert "epoch 2, step 1" in str(err.value), f"the message must name epoch 2, step 1: {err.value}"
    kept = load_checkpoint(ckpt)
    assert kept["epoch"] == 1, f"the checkpoint must stay at the last good epoch 1, found {kept['epoch']}"
    assert all(torch.equal(kept["model"][k], good[k]) for k in good), "the kept checkpoint is not epoch 1's weights"
    assert all(torch.isfinite(v).all() for v in kept["model"].values()), "the kept checkpoint holds NaN"


def test_corrupted_checkpoint_names_the_file(tmp_path):
    train, test = make_data(n_train=32, n_test=16)
    ckpt = tmp_path / "train.ckpt"
    ckpt.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(UserError) as err:
        train_baseline(Scaled(), train, test, TrainConfig(epochs=1), ckpt, quiet=True)
    assert str(ckpt) in str(err.value), f"the error does not name the checkpoint: {err.value}"


@pytest.mark.parametrize("quiet, rank, shown", [(False, "0", True), (True, "0", False), (False, "1", False)])
def test_progress_is_silent_when_quiet_or_off_rank_0(monkeypatch, quiet, rank, shown):
    from lrx.base import progress as progress_mod

    monkeypatch.setenv("RANK", rank)
    with progress_mod.progress(3, "epoch 1/1", quiet) as bar:
        for _ in bar.wrap(range(3)):
            bar.show(loss=0.5, acc=90.0)
    assert (bar._progress is not None) == shown, f"quiet={quiet}, RANK={rank}: bar shown should be {shown}"
    assert list(progress_mod.track(range(4), 4, "x", quiet)) == [0, 1, 2, 3], "track must yield every item"


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    from lrx.train.baseline import lr_factor

    total, warmup = 10, 4
    factors = [lr_factor(step, total, warmup, cosine=True) for step in range(total)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0], f"linear warm-up to 1: {factors[:4]}"
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(0.0, abs=1e-12), f"cosine from 1 to 0: {factors}"
    assert factors[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5))), "half a cosine over the steps after warm-up"
    assert all(a >= b for a, b in zip(factors[3:], factors[4:])), "never rises after the warm-up"
    assert [lr_factor(s, total, 2, cosine=False) for s in range(4)] == [0.5, 1.0, 1.0, 1.0], "warm-up, then constant"


def test_baseline_learning_rate_follows_the_schedule_step_by_step(tmp_path, monkeypatch):
    """The optimiser sees lr x lr_factor at every step: warm-up over 1 epoch, cosine over the rest."""
    from lrx.train.baseline import lr_factor

    train, test = make_data(n_train=64, n_test=16)  # 64 images, batch 32: 2 steps per epoch
    seen = []
    real_step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    train_baseline(Scaled(), train, test, TrainConfig(epochs=3, lr=0.1, warmup_epochs=1), tmp_path / "t.ckpt", quiet=True)
    steps = len(seen)
    assert steps == 6, f"3 epochs of 2 steps: {steps}"
    assert seen == pytest.approx([0.1 * lr_factor(i, 6, 2, True) for i in range(6)]), seen
    assert seen[0] == pytest.approx(0.05) and seen[-1] == pytest.approx(0.0, abs=1e-12), seen


def test_adamw_uses_the_fused_kernel_for_float_parameters_only():
    from lrx.train.baseline import adamw, fusable

    model = nn.Linear(4, 2)
    assert adamw(model.parameters(), lr=1e-3, weight_decay=0.0).defaults["fused"] is True
    assert not fusable([torch.zeros(3, dtype=torch.int64)]) and not fusable([]), "integer tensors and empty lists take the default kernel"
    fused, plain = nn.Linear(4, 2), nn.Linear(4, 2)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(8, 4)
    opts = [adamw(fused.parameters(), lr=1e-2, weight_decay=0.01),
            torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.01)]
    for _ in range(3):
        for net, opt in zip((fused, plain), opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    assert torch.allclose(fused.weight, plain.weight, atol=1e-6), "the fused kernel computes AdamW's update"


def test_with_validation_images_epochs_are_chosen_on_them_and_the_test_is_evaluated_once(tmp_path, monkeypatch):
    model = Scaled()
    train, test = make_data(n_train=64)
    xv, yv = synthetic(60, 16, seed=2)
    val = Batches(xv, yv, 50, 16, "cpu", shuffle=False, seed=0)
    fake = iter([50.0, 90.0, 70.0])
    asked = []
    monkeypatch.setattr(train_mod, "evaluate", lambda model, batches, *a, **k: asked.append(batches) or next(fake))
    tested = []
    real = train_mod.correct_per_image
    monkeypatch.setattr(train_mod, "correct_per_image", lambda m, b, *a, **k: tested.append(b) or real(m, b, *a, **k))
    snapshots = {}
    result = train_baseline(model, train, test, TrainConfig(epochs=3), tmp_path / "t.ckpt", quiet=True, val=val,
                            on_epoch=lambda epoch, rec: snapshots.update({epoch: state(model)}))
    assert all(b is val for b in asked) and len(asked) == 3, "every epoch is evaluated on the validation images only"
    assert tested == [test], "the test images are evaluated once, on the kept model"
    assert result["best_epoch"] == 2 and result["val_acc1"] == 90.0 and result["selected_on"] == "validation"
    assert all(torch.equal(v, snapshots[2][k]) for k, v in state(model).items()), "the model holds epoch 2's weights"
    bits = unpack(result["test_correct"])
    assert result["acc1"] == pytest.approx(100 * bits.mean()) and len(bits) == 128, "acc1 is the kept model's test figure"
