"""L2 / CE fine-tuning of a tiny CNN on synthetic images: freezing, metrics, keep rules, resume, NaN."""
import copy
import math

import pytest
import torch
from torch import nn

from lrx.train import finetune
from lrx.base.files import load_checkpoint
from lrx.config.settings import StageConfig
from lrx.data.datasets import Batches, synthetic
from lrx.base.errors import UserError
from lrx.train.finetune import LayerTaps, l2_norm, measure, run_stage
from lrx.train.loop import correct_per_image
from lrx.train.baseline import TrainingDiverged, is_better

REPLACED = ["3", "6"]  # module names of the two convolutions the student replaces


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),  # 0 1 2
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 3 4 5
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),  # 6 7
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10),  # 8 9 10 11
    )


class LowRank(nn.Sequential):
    """A stand-in for an expanded layer: k x k conv to ``rank`` channels, then a 1x1 conv."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__(nn.Conv2d(conv.in_channels, rank, conv.kernel_size, padding=conv.padding, bias=False),
                         nn.Conv2d(rank, conv.out_channels, 1))


def make_pair(seed=0):
    teacher = tiny_cnn(seed)
    teacher.eval()
    student = copy.deepcopy(teacher)
    torch.manual_seed(seed + 100)
    for name in REPLACED:
        student[int(name)] = LowRank(teacher[int(name)], rank=4)
    return student, teacher


def make_data(n_train=256, n_test=128, size=16, batch=32):
    x, y = synthetic(n_train, size, seed=0)
    xt, yt = synthetic(n_test, size, seed=1)
    return (Batches(x, y, batch, size, "cpu", shuffle=True, seed=0),
            Batches(xt, yt, 64, size, "cpu", shuffle=False, seed=0))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def replaced_key(key):
    return key.split(".")[0] in REPLACED


# ---------------------------------------------------------------- taps and the L2 norm


def test_taps_keep_the_layer_output_before_an_inplace_relu():
    model = tiny_cnn()
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model[:4](x)  # up to conv 3, whose ReLU (4) is in place
        with LayerTaps(model, ["3"]) as taps:
            out = taps(model, x)
        assert (expected < 0).any(), "test setup: the conv output should have negative values"
        torch.testing.assert_close(taps.outputs["3"], expected, msg="the tapped output was changed by the in-place ReLU")
        torch.testing.assert_close(out, model(x), msg="tapping changed the model's output")
    assert not model[3]._forward_hooks, "the hooks were not removed"


def test_taps_can_stop_after_the_last_tapped_layer():
    model = tiny_cnn()
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    calls = []
    model[11].register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad(), LayerTaps(model, REPLACED, stop_early=True) as taps:
        first, second = taps(model, x), taps(model, x)
        assert first is not None and second is None, "the second pass should stop after layer 6 and return None"
        assert set(taps.outputs) == set(REPLACED), "a stopped pass must still keep every tapped output"
    assert len(calls) == 1, "the classifier ran in the pass that should have stopped early"


def test_unknown_layer_name_is_a_user_error():
    with pytest.raises(UserError, match="'99'"):
        LayerTaps(tiny_cnn(), ["3", "99"])


def test_l2_norm_matches_a_direct_computation():
    student, teacher = make_pair()
    _, test = make_data(n_test=70)
    student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, _ in test:
            for name in REPLACED:
                cut = int(name) + 1
                diff = (student[:cut](x) - teacher[:cut](x)).flatten(1)
                total += diff.norm(dim=1).sum().item()
            count += len(x)
    expected = total / count
    got = l2_norm(student, teacher, REPLACED, test)
    assert math.isclose(got, expected, rel_tol=1e-5), f"l2_norm {got} != per-sample norm averaged, summed {expected}"
    assert l2_norm(teacher, copy.deepcopy(teacher), REPLACED, test) == 0.0, "identical models must have L2 norm 0"


def test_l2_norm_of_a_constant_offset():
    teacher = tiny_cnn()
    teacher.eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[6].bias += 0.5
    _, test = make_data(n_test=64)
    got = l2_norm(student, teacher, ["6"], test)
    expected = 0.5 * math.sqrt(16 * 8 * 8)  # every one of C*H*W outputs is off by 0.5
    assert math.isclose(got, expected, rel_tol=1e-4), f"L2 norm {got}, expected {expected}"


def test_mismatched_output_shape_is_a_user_error():
    student, teacher = make_pair()
    student[3] = nn.Conv2d(8, 16, 3, padding=0)
    student[6] = nn.Conv2d(16, 16, 3, padding=1)
    student[8] = nn.AdaptiveAvgPool2d(2)
    _, test = make_data(n_test=8)
    with pytest.raises(UserError, match="shape"):
        l2_norm(student, teacher, ["3"], test)


# ---------------------------------------------------------------- the L2 stage


def test_l2_stage_trains_only_the_replaced_layers(tmp_path, monkeypatch):
    student, teacher = make_pair()
    train, test = make_data()
    before, teacher_before = state(student), state(teacher)
    given = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(finetune.torch.optim, "AdamW", lambda params, **kw: given.append(list(params)) or real_adamw(given[-1], **kw))
    modes = []
    student[0].register_forward_pre_hook(lambda m, a: modes.append(m.training) if torch.is_grad_enabled() else None)
    result = run_stage(student, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=2, lr=1e-2),
                       tmp_path / "s.ckpt", quiet=True)
    after = state(student)
    frozen_changed = [k for k in before if not replaced_key(k) and not torch.equal(before[k], after[k])]
    replaced_same = [k for k in before if replaced_key(k) and torch.equal(before[k], after[k])]
    assert frozen_changed == [], f"parameters/buffers outside the replaced layers changed: {frozen_changed}"
    assert replaced_same == [], f"replaced layers did not train: {replaced_same}"
    expected = {id(p) for n in REPLACED for p in student[int(n)].parameters()}
    assert {id(p) for p in given[0]} == expected, "the optimizer must get exactly the replaced layers' parameters"
    assert modes and not any(modes), "the frozen part of the student must be in eval mode while training"
    assert all(p.requires_grad for p in student.parameters()), "requires_grad was not restored after the stage"
    assert all(torch.equal(teacher_before[k], v) for k, v in state(teacher).items()), "the teacher changed"
    assert result["l2_after"] < result["l2_before"], f"L2 norm did not fall: {result['l2_before']} -> {result['l2_after']}"
    assert result["history"][-1]["loss"] < result["history"][0]["loss"], f"L2 loss did not fall: {result['history']}"
    keys = {"l2", "ce", "epochs", "acc1_before", "acc1_after", "l2_before", "l2_after", "best_epoch", "history", "wall_s",
            "selected_on", "kept_input", "test_correct"}
    assert set(result) == keys, f"result keys {sorted(result)}"
    assert (result["l2"], result["ce"], result["epochs"]) == (1.0, 0.0, 2), "the stage's weights/epochs are reported"


def test_ce_stage_trains_everything(tmp_path):
    student, teacher = make_pair()
    train, test = make_data()
    before = state(student)
    result = run_stage(student, teacher, REPLACED, train, test, StageConfig(ce=1.0, epochs=1, lr=1e-3),
                       tmp_path / "s.ckpt", quiet=True)
    after = state(student)
    unchanged = [k for k in before if not k.endswith("num_batches_tracked") and torch.equal(before[k], after[k])]
    assert unchanged == [], f"a CE stage must train every parameter (and BN statistics); unchanged: {unchanged}"
    assert result["l2_after"] is not None and result["l2_after"] > 0, "a CE stage still reports the L2 norm"


# ---------------------------------------------------------------- which epoch is kept


def test_keep_rule_ties_and_directions():
    best = {"acc1": 80.0, "l2": 10.0}
    assert not is_better({"acc1": 80.0, "l2": 1.0}, best, "best-acc"), "a tie in acc1 keeps the earlier epoch"
    assert is_better({"acc1": 80.1, "l2": 99.0}, best, "best-acc"), "higher acc1 wins under best-acc"
    assert is_better({"acc1": 0.0, "l2": 9.0}, best, "best-l2"), "lower l2 wins under best-l2"
    assert not is_better({"acc1": 99.0, "l2": 10.5}, best, "best-l2"), "higher l2 loses under best-l2"
    assert is_better({"acc1": 0.0, "l2": 99.0}, best, "last"), "last always takes the newest epoch"


@pytest.mark.parametrize("keep, fake, expected_epoch", [
    ("best-acc", [(50.0, 9.0), (90.0, 8.0), (70.0, 5.0)], 2),
    ("best-l2", [(50.0, 9.0), (90.0, 8.0), (70.0, 5.0)], 3),
    ("best-l2", [(50.0, 4.0), (90.0, 8.0), (70.0, 5.0)], 1),
    ("last", [(50.0, 9.0), (90.0, 8.0), (70.0, 5.0)], 3),
])
def test_kept_epoch_and_weights(tmp_path, monkeypatch, keep, fake, expected_epoch):
    student, teacher = make_pair()
    train, test = make_data(n_train=64)
    values = iter([(40.0, 10.0)] + fake)  # the first call measures the model before fine-tuning
    monkeypatch.setattr(finetune, "measure", lambda *a, **k: next(values))
    snapshots = {}
    result = run_stage(student, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=3, lr=1e-2, keep=keep),
                       tmp_path / "s.ckpt", quiet=True, on_epoch=lambda epoch, rec: snapshots.update({epoch: state(student)}))
    assert result["best_epoch"] == expected_epoch, f"{keep} kept epoch {result['best_epoch']}, expected {expected_epoch}"
    acc, l2 = fake[expected_epoch - 1]
    assert (result["acc1_after"], result["l2_after"]) == (acc, l2), "acc1_after/l2_after are not the kept epoch's"
    assert (result["acc1_before"], result["l2_before"]) == (40.0, 10.0), "before-values are not the first measurement"
    final = state(student)
    assert all(torch.equal(final[k], snapshots[expected_epoch][k]) for k in final), \
        f"the student does not hold epoch {expected_epoch}'s weights"


# ---------------------------------------------------------------- resume and failure


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage", [StageConfig(l2=1.0, epochs=3, lr=1e-2), StageConfig(l2=0.01, ce=1.0, epochs=3, lr=1e-3)],
                         ids=["l2", "l2+ce-with-dropout"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, stage):
    train, test = make_data()
    student, teacher = make_pair()
    whole = run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "whole.ckpt", quiet=True, seed=3)
    whole_state = state(student)

    student, teacher = make_pair()

    def stop_after_1(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "cut.ckpt", quiet=True, seed=3,
                  on_epoch=stop_after_1)
    assert load_checkpoint(tmp_path / "cut.ckpt")["epoch"] == 1, "the checkpoint of epoch 1 should be on disk"
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG state it finds
    student, teacher = make_pair()  # a fresh process would rebuild the expanded model
    resumed = run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "cut.ckpt", quiet=True, seed=3)
    for key in ("acc1_before", "acc1_after", "l2_before", "l2_after", "best_epoch", "history"):
        assert resumed[key] == whole[key], f"{key}: resumed {resumed[key]} != uninterrupted {whole[key]}"
    assert all(torch.equal(whole_state[k], v) for k, v in state(student).items()), "resumed weights differ"

    again = run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "cut.ckpt", quiet=True, seed=3)
    assert again["history"] == whole["history"], "re-running a finished stage must return its results unchanged"


class Poisonable(nn.Module):
    """Wraps a layer; its training-time forward number ``poison_at`` returns NaN."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.poison_at = inner, 0, None

    def forward(self, x):
        out = self.inner(x)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.poison_at is not None and self.calls >= self.poison_at:
                out = out * float("nan")
        return out


def test_nan_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path):
    student, teacher = make_pair()
    student[6] = Poisonable(student[6])
    train, test = make_data()
    ckpt = tmp_path / "s.ckpt"
    good = {}

    def poison_epoch_2_step_3(epoch, record):
        good.update(state(student))
        student[6].poison_at = student[6].calls + 3

    with pytest.raises(TrainingDiverged) as err:
        run_stage(student, teacher, ["3", "6"], train, test, StageConfig(l2=1.0, epochs=3, lr=1e-2), ckpt, quiet=True,
                  on_epoch=poison_epoch_2_step_3)
    message = str(err.value)
    assert "epoch 2, step 3" in message and "nan" in message, f"the message must name epoch 2, step 3: {message}"
    assert str(ckpt) in message, f"the message should name the kept checkpoint: {message}"
    assert isinstance(err.value, UserError), "a diverged loss is reported like a user error (one line, exit 2)"
    kept = load_checkpoint(ckpt)
    assert kept["epoch"] == 1, f"the last good checkpoint (epoch 1) was not kept: epoch {kept['epoch']}"
    assert all(torch.equal(kept["model"][k], good[k]) for k in good), "the kept checkpoint is not epoch 1's weights"
    assert all(p.requires_grad for p in student.parameters()), "requires_grad was not restored after the failure"


def test_corrupted_stage_checkpoint_is_a_user_error(tmp_path):
    student, teacher = make_pair()
    train, test = make_data(n_train=32, n_test=16)
    ckpt = tmp_path / "stage0.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError) as err:
        run_stage(student, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=1), ckpt, quiet=True)
    assert str(ckpt) in str(err.value), f"the error does not name the checkpoint: {err.value}"


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    student, teacher = make_pair()
    train, test = make_data(n_train=32, n_test=16)
    ckpt = tmp_path / "stage0.ckpt"
    run_stage(student, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=1), ckpt, quiet=True)
    with pytest.raises(UserError, match="lr"):
        run_stage(student, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=1, lr=0.5), ckpt, quiet=True)


def test_zero_epochs_reports_the_starting_point(tmp_path):
    student, teacher = make_pair()
    train, test = make_data(n_train=32, n_test=32)
    acc1, l2 = measure(student, teacher, REPLACED, test)
    result = run_stage(student, teacher, REPLACED, train, test, StageConfig(ce=1.0, epochs=0), tmp_path / "s.ckpt", quiet=True)
    assert (result["acc1_after"], result["l2_after"], result["best_epoch"]) == (acc1, l2, 0), \
        f"with 0 epochs the after-values must equal the before-values: {result}"


def test_checkpoint_of_another_structure_is_a_user_error(tmp_path):
    student, teacher = make_pair()
    train, test = make_data(n_train=32, n_test=16)
    ckpt = tmp_path / "stage0.ckpt"
    run_stage(student, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=1), ckpt, quiet=True)
    other = copy.deepcopy(teacher)
    for name in REPLACED:
        other[int(name)] = LowRank(teacher[int(name)], rank=3)  # other ranks, same settings
    with pytest.raises(UserError) as err:
        run_stage(other, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=1), ckpt, quiet=True)
    assert str(ckpt) in str(err.value) and "does not fit" in str(err.value), f"unexpected error: {err.value}"
    assert "\n" not in str(err.value), "the error must be one line"


@pytest.mark.parametrize("scheme, options", [("v1", {}), ("v1", {"decomposed": True}), ("v2", {})],
                         ids=["v1", "v1-decomposed", "v2"])
def test_l2_stage_on_real_expanded_layers(tmp_path, scheme, options):
    lowrank = pytest.importorskip("lrx.expansion.model")
    teacher = tiny_cnn()
    teacher.eval()
    student, report = lowrank.expand(teacher, layers=[2, 3], scheme=scheme, ranks=[3, 3], input_size=(3, 16, 16), **options)
    names = [layer["name"] for layer in report.layers]
    assert names == REPLACED, f"test setup: conv positions 2 and 3 are modules {REPLACED}, got {names}"
    train, test = make_data()
    before = state(student)
    result = run_stage(student, teacher, names, train, test, StageConfig(l2=1.0, epochs=2, lr=1e-2), tmp_path / "s.ckpt",
                       quiet=True)
    after = state(student)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    params = sorted(f"{n}.{p}" for n in names for p, _ in student.get_submodule(n).named_parameters())
    assert changed == params, f"{scheme}: changed {changed}, expected exactly the expanded layers' parameters {params}"
    assert result["l2_after"] < result["l2_before"], f"{scheme}: L2 norm did not fall: {result}"


# ---------------------------------------------------------------- chosen on validation images, the input as epoch 0


def make_val(n=96, size=16):
    x, y = synthetic(n, size, seed=2)
    return Batches(x, y, 64, size, "cpu", shuffle=False, seed=0)


def test_a_stage_that_makes_the_model_worse_hands_on_its_input(tmp_path):
    student, teacher = make_pair()
    train, test = make_data()
    run_stage(student, teacher, REPLACED, train, test, StageConfig(ce=1.0, epochs=3, lr=3e-3), tmp_path / "a.ckpt",
              quiet=True)  # a student above chance (about 27% on the validation images, chance is 10%)
    given = state(student)
    result = run_stage(student, teacher, REPLACED, train, test, StageConfig(ce=1.0, epochs=2, lr=0.3),
                       tmp_path / "s.ckpt", quiet=True, val=make_val())  # lr 0.3: AdamW steps that wreck it
    assert all(r["acc1"] <= result["validation"]["acc1_before"] for r in result["history"]), \
        f"lr 1e3 should ruin every epoch on the validation images: {result['history']}"
    assert result["best_epoch"] == 0 and result["kept_input"] is True and result["selected_on"] == "validation"
    assert all(torch.equal(given[k], v) for k, v in state(student).items()), "the output is not the input model"
    assert (result["acc1_after"], result["l2_after"]) == (result["acc1_before"], result["l2_before"]), \
        "the test figures after are the input's"
    assert all(p.requires_grad for p in student.parameters())


def test_with_validation_images_no_epoch_is_evaluated_on_the_test_images(tmp_path, monkeypatch):
    student, teacher = make_pair()
    train, test = make_data(n_train=64)
    val = make_val()
    seen = []
    real = finetune.measure
    monkeypatch.setattr(finetune, "measure", lambda s, t, n, batches, *a, **k: seen.append(batches) or real(s, t, n, batches, *a, **k))
    result = run_stage(student, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=3, lr=1e-2, keep="best-l2"),
                       tmp_path / "s.ckpt", quiet=True, val=val)
    assert [b is val for b in seen] == [True, False, True, True, True, False], \
        "the input on validation and on test, each epoch on validation, then the kept model on test"
    best = min(range(4), key=lambda e: ([result["validation"]["l2_before"]] + [r["l2"] for r in result["history"]])[e])
    assert result["best_epoch"] == best, f"best-l2 over epochs 0..3 on validation: {result}"


def test_resumed_with_validation_equals_uninterrupted(tmp_path):
    train, test = make_data()
    stage = StageConfig(l2=0.01, ce=1.0, epochs=3, lr=1e-3)
    student, teacher = make_pair()
    whole = run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "whole.ckpt", quiet=True, seed=3,
                      val=make_val())
    whole_state = state(student)

    def stop_after_2(epoch, record):
        if epoch == 2:
            raise Interrupt

    student, teacher = make_pair()
    with pytest.raises(Interrupt):
        run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "cut.ckpt", quiet=True, seed=3,
                  on_epoch=stop_after_2, val=make_val())
    student, teacher = make_pair()
    resumed = run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "cut.ckpt", quiet=True, seed=3,
                        val=make_val())
    for key in ("acc1_before", "acc1_after", "l2_before", "l2_after", "best_epoch", "history", "validation",
                "test_correct", "kept_input"):
        assert resumed[key] == whole[key], f"{key}: resumed {resumed[key]} != uninterrupted {whole[key]}"
    assert all(torch.equal(whole_state[k], v) for k, v in state(student).items()), "resumed weights differ"


def test_the_input_kept_survives_a_resume(tmp_path):
    """Stopped after epoch 1 with the input still the best: the resumed stage can still hand it on."""
    train, test = make_data()
    student, teacher = make_pair()
    run_stage(student, teacher, REPLACED, train, test, StageConfig(ce=1.0, epochs=3, lr=3e-3), tmp_path / "a.ckpt",
              quiet=True)
    trained = state(student)
    stage = StageConfig(ce=1.0, epochs=2, lr=0.3)
    given = state(student)

    def stop_after_1(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "cut.ckpt", quiet=True,
                  on_epoch=stop_after_1, val=make_val())
    student, teacher = make_pair()
    student.load_state_dict(trained)  # a fresh process would load the stage's input again
    result = run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "cut.ckpt", quiet=True, val=make_val())
    assert result["best_epoch"] == 0 and all(torch.equal(given[k], v) for k, v in state(student).items()), \
        "after a resume the input is still epoch 0's candidate and is handed on"


# ---------------------------------------------------------------- distillation (kd)


def test_distillation_is_hintons_softened_kl_times_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    t = 3.0
    p, q = torch.softmax(teacher / t, 1), torch.softmax(student / t, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * t * t
    assert finetune.distillation(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert finetune.distillation(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6), "no loss at the teacher"
    with pytest.raises(UserError, match="same classes"):
        finetune.distillation(student[:, :5], teacher, t)


def test_a_kd_stage_trains_every_layer_towards_the_original(tmp_path):
    student, teacher = make_pair()
    train, test = make_data()
    before = state(student)
    result = run_stage(student, teacher, REPLACED, train, test, StageConfig(kd=1.0, temperature=2.0, epochs=2, lr=1e-3),
                       tmp_path / "s.ckpt", quiet=True)
    unchanged = [k for k, v in state(student).items() if not replaced_key(k) and v.is_floating_point()
                 and torch.equal(v, before[k])]
    assert unchanged == [], f"kd, like ce, trains the whole student: {unchanged}"
    assert result["history"][-1]["loss"] < result["history"][0]["loss"], f"the kd loss fell: {result['history']}"
    x = next(iter(test))[0]
    with torch.no_grad():
        gap_after = finetune.distillation(student.eval()(x), teacher(x), 2.0).item()
        first, _ = make_pair()
        gap_before = finetune.distillation(first.eval()(x), teacher(x), 2.0).item()
    assert gap_after < gap_before, f"the student's softened logits moved towards the original's: {gap_before} -> {gap_after}"


def test_kd_combines_with_l2_and_ce_and_is_labelled(tmp_path, monkeypatch):
    student, teacher = make_pair()
    train, test = make_data(n_train=64)
    stage = StageConfig(l2=0.01, ce=1.0, kd=0.5, temperature=4.0, epochs=1, lr=1e-3)
    terms = []
    real = finetune.distillation
    monkeypatch.setattr(finetune, "distillation", lambda s, t, temp: terms.append(temp) or real(s, t, temp))
    result = run_stage(student, teacher, REPLACED, train, test, stage, tmp_path / "s.ckpt", quiet=True)
    assert terms and set(terms) == {4.0}, "every step adds the kd term at its temperature"
    assert finetune.stage_label(stage) == "l2 0.01 + ce 1 + kd 0.5 (T 4)"
    assert math.isfinite(result["history"][0]["loss"])


def test_fine_tuning_without_a_teacher_is_refused(tmp_path):
    student, _ = make_pair()
    train, test = make_data(n_train=32, n_test=16)
    with pytest.raises(UserError, match="teacher"):
        run_stage(student, None, REPLACED, train, test, StageConfig(kd=1.0), tmp_path / "s.ckpt", quiet=True)
    assert not (tmp_path / "s.ckpt").exists(), "nothing written"


def test_measure_gives_the_per_image_correctness_of_its_own_pass():
    student, teacher = make_pair()
    _, test = make_data(n_test=70)
    bits: list = []
    acc1, l2 = measure(student, teacher, REPLACED, test, per_image=bits)
    assert torch.equal(bits[0], correct_per_image(student, test)), "the same per-image correctness as a pass of its own"
    assert acc1 == pytest.approx(100.0 * bits[0].sum().item() / 70) and l2 == pytest.approx(l2_norm(student, teacher, REPLACED, test))


def test_given_input_figures_are_not_measured_again_on_the_test_images(tmp_path, monkeypatch):
    student, teacher = make_pair()
    train, test = make_data(n_train=64)
    val = make_val()
    seen = []
    real = finetune.measure
    monkeypatch.setattr(finetune, "measure", lambda s, t, n, batches, *a, **k: seen.append(batches) or real(s, t, n, batches, *a, **k))
    monkeypatch.setattr(finetune, "correct_per_image", lambda *a, **k: pytest.fail("the test pass gives the bits"))
    result = run_stage(student, teacher, REPLACED, train, test, StageConfig(l2=1.0, epochs=1, lr=1e-2),
                       tmp_path / "s.ckpt", quiet=True, val=val, before_test={"acc1": 12.5, "l2": 3.25})
    assert [b is test for b in seen] == [False, False, True], "validation before and after the epoch, then the test images once"
    assert (result["acc1_before"], result["l2_before"]) == (12.5, 3.25), "the given input figures are reported"
    assert result["test_correct"]["n"] == 128 and result["test_correct"]["correct"] == round(result["acc1_after"] * 1.28)
