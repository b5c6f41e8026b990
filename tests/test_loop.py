"""The shared epoch loop: LoopState through a checkpoint, keep rules, checkpoints per epoch, the NaN stop."""
import contextlib

import pytest
import torch
from torch import nn

from lrx.base import errors

from lrx.train import loop

from lrx.train import baseline as train
from lrx.base.files import load_checkpoint
from lrx.train.loop import LoopState, epoch_line, fit, resume

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"kind": "test", "lr": 0.1}


class Batches(list):
    """Four random (x (2, 4), y (2,)) batches with the ``set_epoch`` of :class:`lrx.data.datasets.Batches`."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        super().__init__((torch.randn(2, 4, generator=g), torch.randint(0, 3, (2,), generator=g)) for _ in range(4))

    def set_epoch(self, epoch):
        self.epoch = epoch


def mse(model, x, y):
    return model(x).square().mean()


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(path, epochs, metrics, keep="best-acc", state=None, model=None, loss=mse, **hooks):
    """``fit`` a dropout model on :class:`Batches`; each epoch's record takes the next dict of ``metrics``."""
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = state if state is not None else resume(path, SETTINGS, model, optimizer)
    values = iter(metrics)
    fit(model, Batches(), optimizer, state, epochs, epoch_loss=lambda: contextlib.nullcontext(loss),
        evaluate_epoch=lambda: next(values), keep=keep, ckpt_path=path, settings=SETTINGS, started=0.0, **hooks)
    return model, optimizer, state


def test_loop_state_round_trips_through_the_checkpoint(tmp_path):
    path = tmp_path / "s.ckpt"
    model, _, state = run(path, 3, [{"acc1": 50.0}, {"acc1": 90.0}, {"acc1": 70.0}],
                          state=LoopState(extra={"before": {"acc1": 10.0, "l2": 2.0}}))
    after_fit = torch.rand(5)  # nothing after the last save draws from the RNG
    torch.manual_seed(123)
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    back = resume(path, SETTINGS, fresh, optimizer)
    assert back.resumed and not state.resumed, "resumed says whether the state came from disk"
    assert (back.history, back.best_epoch, back.next_epoch) == (state.history, 2, 4), \
        f"history/best_epoch/next_epoch differ: {back.best_epoch}, {back.next_epoch}"
    assert back.extra == {"before": {"acc1": 10.0, "l2": 2.0}}, f"the caller's extra keys come back: {back.extra}"
    assert back.best == {"epoch": 2, "loss": state.history[1]["loss"], "acc1": 90.0}, f"best record {back.best}"
    assert back.best_state.keys() == state.best_state.keys() and \
        all(torch.equal(back.best_state[k], v) for k, v in state.best_state.items()), "the kept weights differ"
    ckpt = load_checkpoint(path)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in state_of(fresh).items()), "resume must load epoch 3's weights"
    assert back.wall_s == ckpt["wall_s"], "wall_s comes from the checkpoint"
    assert torch.equal(torch.rand(5), after_fit), "resume must restore the RNG state saved with the last epoch"
    assert optimizer.state_dict()["state"].keys() == ckpt["optimizer"]["state"].keys(), "optimizer state not restored"


def test_fresh_state_when_there_is_no_checkpoint(tmp_path):
    model = nn.Linear(4, 3)
    state = resume(tmp_path / "none.ckpt", SETTINGS, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert state == LoopState(), f"no checkpoint must give the empty state: {state}"
    assert state.best is None, "no best record before any epoch"


@pytest.mark.parametrize("keep, metrics, expected", [
    ("best-acc", [(50.0, 9.0), (90.0, 8.0), (70.0, 5.0)], 2),
    ("best-acc", [(90.0, 9.0), (90.0, 8.0), (70.0, 5.0)], 1),  # a tie keeps the earlier epoch
    ("best-l2", [(50.0, 9.0), (90.0, 8.0), (70.0, 5.0)], 3),
    ("best-l2", [(50.0, 4.0), (90.0, 8.0), (70.0, 5.0)], 1),
    ("last", [(50.0, 9.0), (90.0, 8.0), (70.0, 5.0)], 3),
])
def test_keep_rule_picks_the_epoch_and_its_weights(tmp_path, keep, metrics, expected):
    snapshots = {}
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model, _, state = run(tmp_path / "s.ckpt", 3, [{"acc1": a, "l2": l2} for a, l2 in metrics], keep=keep, model=model,
                          on_epoch=lambda epoch, record: snapshots.update({epoch: state_of(model)}))
    assert state.best_epoch == expected, f"{keep} kept epoch {state.best_epoch}, expected {expected}"
    assert all(torch.equal(v, snapshots[expected][k]) for k, v in state_of(model).items()), \
        f"the model must hold epoch {expected}'s weights after fit"
    ckpt = load_checkpoint(tmp_path / "s.ckpt")
    assert ckpt["best_epoch"] == expected, f"the checkpoint names kept epoch {ckpt['best_epoch']}"
    assert (ckpt["best"] is None) == (expected == 3), "the checkpoint stores kept weights only when they are not its own"


def test_a_checkpoint_before_the_first_epoch_and_after_every_epoch(tmp_path, monkeypatch):
    path = tmp_path / "s.ckpt"
    written = []
    recorded = lambda obj, p: written.append((obj["epoch"], len(obj["history"]), obj.get("before")))  # noqa: E731
    monkeypatch.setattr(loop, "save_atomic", recorded)
    _, _, state = run(path, 2, [{"acc1": 1.0}, {"acc1": 2.0}], state=LoopState(extra={"before": 7}))
    assert written == [(0, 0, 7), (1, 1, 7), (2, 2, 7)], f"epochs, history lengths and extras written: {written}"
    monkeypatch.undo()
    run(path, 2, [{"acc1": 1.0}, {"acc1": 2.0}])  # writes to disk this time
    written.clear()
    monkeypatch.setattr(loop, "save_atomic", recorded)
    _, _, state = run(path, 3, [{"acc1": 3.0}])  # resumes from epoch 2's checkpoint
    assert state.resumed and len(state.history) == 3, f"the resumed run adds epoch 3: {state.history}"
    assert [w[0] for w in written] == [3], f"a resumed run writes only the epochs it runs: {written}"


def test_nan_stops_naming_the_epoch_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "s.ckpt"
    epochs_seen = []

    def loss(model, x, y):
        value = mse(model, x, y)
        return value * float("nan") if len(epochs_seen) == 2 else value

    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    with pytest.raises(errors.TrainingDiverged) as err:
        run(path, 3, [{"acc1": 1.0}, {"acc1": 2.0}], model=model, loss=loss,
            set_modes=lambda: epochs_seen.append(1) or model.train())
    assert (err.value.epoch, err.value.step) == (2, 1), f"stopped at epoch {err.value.epoch}, step {err.value.step}"
    message = str(err.value)
    assert str(path) in message and "the checkpoint of epoch 1 is kept" in message, f"message: {message}"
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1, f"the checkpoint must stay at epoch 1: {ckpt['epoch']}"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values()), "the kept checkpoint holds NaN"


def test_training_diverged_is_a_user_error_reachable_from_train():
    assert train.TrainingDiverged is errors.TrainingDiverged, "lrx.train.baseline.TrainingDiverged must stay the same class"
    err = errors.TrainingDiverged(float("inf"), 3, 5, 10, "x.ckpt", 2)
    assert isinstance(err, errors.UserError), "a diverged loss is reported like a user error"
    assert str(err).startswith("x.ckpt: the loss became inf at epoch 3, step 5 of 10"), f"message: {err}"


def test_epoch_line_shows_the_l2_norm_only_when_measured():
    base = {"epoch": 2, "loss": 0.123456, "acc1": 91.234}
    assert epoch_line(base, 5, 1) == "epoch 2/5: loss 0.1235, acc@1 91.23% (kept: epoch 1)", epoch_line(base, 5, 1)
    line = epoch_line({**base, "l2": 1234.5}, 5, 2)
    assert line == "epoch 2/5: loss 0.1235, acc@1 91.23%, L2 norm 1234 (kept: epoch 2)", line
