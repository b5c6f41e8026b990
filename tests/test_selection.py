"""Choices made on validation images: the split held out of training, bad sizes refused, the kept epochs
chosen without the test images, what metrics.json says about each choice and how sure each accuracy is."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lrx.data.datasets as datasets
from conftest import TINY_BASE, write_yaml
from lrx.cli import app
from lrx.config.settings import load_config
from lrx.data.datasets import data_splits, load_splits, subset_indices
from lrx.data.splits import DEFAULT_MAX, validation_count
from lrx.measure.accuracy import unpack, wilson
from lrx.pipeline.runner import run_with_dependencies, stage_hashes
from lrx.pipeline.rundir import load_model
from test_data import write_image_folder

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_configs(folder: Path, select_on: str | None = None) -> Path:
    """b01 trains 3 epochs; b02 expands it and fine-tunes twice (L2, CE), 2 epochs each; no profiles."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 3}, "profile": {"enabled": False}}
    if select_on is not None:
        base["select_on"] = select_on
    write_yaml(folder / "base.yaml", base)
    write_yaml(folder / "b01.yaml", {"extends": "base.yaml", "no": 1})
    write_yaml(folder / "b02.yaml", {"extends": "base.yaml", "no": 2, "baseline": "b01",
                                     "decompose": {"layers": [2, 3, 4], "scheme": "v1", "bases": [4, 4, 3]},
                                     "finetune": [{"l2": 1.0, "epochs": 2, "keep": "best-l2", "lr": 3e-3},
                                                  {"ce": 1.0, "epochs": 2, "lr": 1e-3}]})
    return folder


def images_of(dataset) -> set[bytes]:
    return {bytes(image.numpy().tobytes()) for image in dataset.images}


# ---------------------------------------------------------------- the split


def test_validation_is_held_out_of_the_training_split_seeded_and_disjoint(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {**TINY_BASE, "data": {**TINY_BASE["data"], "val_subset": 300}})
    splits = data_splits(load_config(path), tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (256, 300, 128), "train_subset, val_subset, test"
    assert not images_of(splits.train) & images_of(splits.val), "no image is both trained on and validated on"
    again = data_splits(load_config(path), tmp_path)
    assert torch.equal(again.val.images, splits.val.images), "the same seed holds out the same images"
    other = data_splits(load_config(path, ["seed=1"]), tmp_path)
    assert not torch.equal(other.val.images, splits.val.images), "another seed holds out other images"
    assert torch.equal(other.test.images, data_splits(load_config(path, ["seed=1"]), tmp_path).test.images)
    old = data_splits(load_config(path, ["select_on=test", "data.val_subset=null"]), tmp_path)
    assert old.val is None, "select_on: test holds nothing out"
    x, _ = datasets.load_split("synthetic", tmp_path, "train", True, 16, 10)
    assert torch.equal(old.train.images, x[subset_indices(2000, 256, 0)]), "select_on: test reads train as before"
    assert torch.equal(old.test.images, splits.test.images), "the test images do not depend on the validation split"


def test_the_default_validation_split_is_a_tenth_at_most_5000():
    class Data:
        val_subset = val_fraction = train_subset = None

    d = Data()
    assert [validation_count(d, n) for n in (2000, 50_000, 60_000, 7)] == [200, 5000, DEFAULT_MAX, 1]
    d.val_fraction = 0.25
    assert validation_count(d, 60_000) == 15_000, "a fraction given is not capped"
    d.val_fraction, d.val_subset = None, 123
    assert validation_count(d, 60_000) == 123


def test_an_image_folder_with_val_and_test_validates_on_val(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=4, size=12)  # train/: 12, val/: 6
    cfg = {"model": {"name": "tiny_cnn", "num_classes": 3}, "train": {"epochs": 0}, "profile": {"enabled": False},
           "data": {"name": "imagefolder", "root": str(images), "image_size": 16, "workers": 0}}
    carved = data_splits(load_config(write_yaml(tmp_path / "a.yaml", cfg)), images)
    assert (len(carved.train), len(carved.val), len(carved.test)) == (11, 1, 6), "val/ alone is the test split"
    (images / "val").rename(images / "test")
    write_image_folder(tmp_path / "other", per_class=2, size=12)
    (tmp_path / "other" / "val").rename(images / "val")  # train/ 12, val/ 3, test/ 6
    both = load_splits(load_config(write_yaml(tmp_path / "b.yaml", cfg)))
    assert (both.train.images.shape[0], both.val.images.shape[0], both.test.images.shape[0]) == (12, 3, 6), \
        "with val/ and test/, train/ is trained on whole, val/ validates, test/ is reported"
    assert both.val.labels.tolist() == [0, 1, 2], "val/'s labels are the training classes"
    cfg["data"]["val_fraction"] = 0.5
    result = runner.invoke(app, ["run", str(write_yaml(tmp_path / "c.yaml", cfg)), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "data.val_fraction" in result.output and "val/" in result.output, result.output
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- bad sizes: one line, exit 2, nothing written


@pytest.mark.parametrize("overrides, key", [
    (["data.val_subset=2000"], "data.val_subset"),  # as many as the training split holds
    (["data.val_subset=5000"], "data.val_subset"),  # more
    (["data.val_subset=1800"], "data.train_subset"),  # with train_subset 256: 2056 > 2000
    (["data.val_fraction=0.9"], "data.train_subset"),
    (["data.val_subset=100", "data.val_fraction=0.1"], "data.val_fraction"),  # both
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["select_on=test", "data.val_subset=100"], "data.val_subset"),  # sizes a split nothing uses
])
def test_bad_validation_sizes_are_one_line_exit_2_and_write_nothing(tmp_path, overrides, key):
    folder = tiny_configs(tmp_path / "configs")
    runs = tmp_path / "runs"
    args = ["run", str(folder / "b01.yaml"), "--runs-dir", str(runs)]
    for assignment in overrides:
        args += ["--set", assignment]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "b01.yaml" in lines[0], f"one line naming {key}: {result.output}"
    assert not runs.exists(), "nothing written"


def test_an_image_folder_too_small_for_its_validation_split_is_refused_before_a_run(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=2, size=12)  # 6 training images
    path = write_yaml(tmp_path / "c.yaml", {"model": {"name": "tiny_cnn", "num_classes": 3}, "train": {"epochs": 0},
                                            "data": {"name": "imagefolder", "root": str(images), "image_size": 16,
                                                     "workers": 0, "val_subset": 2, "train_subset": 5}})
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "data.train_subset" in result.output and "6 images" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- choices never look at the test images


def run_tiny(folder: Path, runs: Path) -> dict:
    run_with_dependencies(load_config(folder / "b02.yaml"), runs, quiet=True)
    return {name: json.loads((runs / name / "metrics.json").read_text()) for name in ("b01", "b02")}


def final_weights(runs: Path, name: str) -> dict:
    path = {"b01": "model.pt", "b02": "stage1.pt"}[name]
    model, _, _ = load_model(runs / name / path, "tiny_cnn", 10)
    return model.state_dict()


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """b01 and b02 run with the default (validation): once as they are, once with the test labels permuted."""
    root = tmp_path_factory.mktemp("selection")
    folder = tiny_configs(root / "configs")
    plain = run_tiny(folder, root / "runs")
    real = datasets.load_split

    def relabelled(name, root_, split, *args):
        images, labels = real(name, root_, split, *args)
        if split == "test":
            labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))]
        return images, labels

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "load_split", relabelled)
        permuted = run_tiny(folder, root / "runs-permuted")
    return root, plain, permuted


def test_relabelling_the_test_images_changes_no_kept_epoch(validated):
    root, plain, permuted = validated
    assert plain["b01"]["acc1"] != permuted["b01"]["acc1"], "the test labels did change what the test measures"
    for name, stages in (("b01", ["train"]), ("b02", ["finetune.0", "finetune.1"])):
        for stage in stages:
            a, b = plain[name]["stages"][stage], permuted[name]["stages"][stage]
            assert a["selected_on"] == b["selected_on"] == "validation"
            assert a["best_epoch"] == b["best_epoch"], f"{name} {stage}: kept epoch {a['best_epoch']} -> {b['best_epoch']}"
            history = "epochs" if stage == "train" else "history"
            assert a[history] == b[history], f"{name} {stage}: the epochs' validation figures moved with the test labels"
        mine, theirs = final_weights(root / "runs", name), final_weights(root / "runs-permuted", name)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"{name}: the kept model depends on the test labels"


def test_with_select_on_test_the_test_labels_do_choose(tmp_path):
    folder = tiny_configs(tmp_path / "configs", select_on="test")
    cfg = load_config(folder / "b01.yaml")
    first = run_with_dependencies(cfg, tmp_path / "runs", quiet=True)
    real = datasets.load_split

    def relabelled(name, root_, split, *args):
        images, labels = real(name, root_, split, *args)
        return images, (labels if split != "test" else (labels + 1) % 10)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "load_split", relabelled)
        second = run_with_dependencies(cfg, tmp_path / "runs-permuted", quiet=True)
    assert first["selected_on"] == second["selected_on"] == "test"
    assert first["stages"]["train"]["epochs"] != second["stages"]["train"]["epochs"], \
        "select_on: test evaluates every epoch on the test images (the control of the test above)"


def test_metrics_say_what_each_choice_was_made_on_and_how_sure_each_accuracy_is(validated):
    _, plain, _ = validated
    base, expanded = plain["b01"], plain["b02"]
    assert base["selected_on"] == expanded["selected_on"] == "validation"
    train = base["stages"]["train"]
    assert 0 <= train["val_acc1"] <= 100 and train["val_acc1"] == train["epochs"][train["best_epoch"] - 1]["acc1"]
    for metrics in (base, expanded):
        bits = unpack(metrics["test_correct"])
        assert len(bits) == 128 and 100 * bits.mean() == pytest.approx(metrics["acc1"]), "the final model's bits"
        low, high = wilson(int(bits.sum()), len(bits))
        assert metrics["acc1_ci"] == pytest.approx([100 * low, 100 * high]) and low * 100 <= metrics["acc1"] <= high * 100
    vs = expanded["vs_original"]
    original = unpack(expanded["stages"]["decompose"]["original_test_correct"])
    assert 100 * original.mean() == pytest.approx(base["acc1"]), "the original measured on the same test images"
    assert vs["diff"] == pytest.approx(expanded["acc1"] - base["acc1"]) and vs["low"] <= vs["diff"] <= vs["high"], vs
    assert vs["images"] == 128 and vs["only_original"] + vs["only_this"] <= 128
    assert [s["selected_on"] for s in expanded["finetune"]] == ["validation", "validation"]
    for stage in ("finetune.0", "finetune.1"):
        record = expanded["stages"][stage]
        assert set(record["validation"]) == {"acc1_before", "acc1_after", "l2_before", "l2_after"}
        kept = record["history"][record["best_epoch"] - 1] if record["best_epoch"] else None
        if kept is not None:
            assert record["validation"]["acc1_after"] == kept["acc1"], "the kept epoch's validation figure"
        assert record["kept_input"] == (record["best_epoch"] == 0)


def test_a_row_built_on_a_baseline_chosen_on_test_says_so(tmp_path):
    folder = tiny_configs(tmp_path / "configs")
    write_yaml(folder / "b01.yaml", {"extends": "base.yaml", "no": 1, "select_on": "test"})
    write_yaml(folder / "b03.yaml", {"extends": "base.yaml", "no": 3, "baseline": "b01",
                                     "decompose": {"layers": [2, 3, 4], "scheme": "v1", "bases": [4, 4, 3]}})
    b03 = run_with_dependencies(load_config(folder / "b03.yaml"), tmp_path / "runs", quiet=True)
    assert b03["selected_on"] == "test", "its original's epoch was chosen on the test images"
    result = runner.invoke(app, ["table", str(tmp_path / "runs"), "--format", "json"])
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["b01"]["selected_on"] == rows["b03"]["selected_on"] == "test"
    assert rows["b03"]["vs_original"] is not None and rows["b01"]["acc1_low"] <= rows["b01"]["acc1"]


# ---------------------------------------------------------------- hashes


def test_select_on_test_keeps_the_hashes_of_runs_made_before_it_existed():
    """Hashes computed by lrx before select_on existed (the quick rows' results were made with them), of the
    quick rows as they were then: 1,000 test images, every choice on them, timed at 3x224x224, L2 then CE. The profile
    stage's changed with profile.rounds and profile.min_time_s: such a profile is re-timed."""
    deps = {"exp01": "a", "exp02": "b", "exp03": "c"}
    then = ["data.test_subset=1000", "select_on=test", "data.val_subset=null", "profile.input_size=[3, 224, 224]"]
    recipe = "finetune=[{l2: 1.0, epochs: 1}, {ce: 1.0, epochs: 1}]"  # rows 10-22 fine-tuned so then
    assert stage_hashes(load_config(CONFIGS / "quick" / "exp01.yaml", then), deps) == {
        "train": "e2787b1a662ab9a6", "profile": "4549bbd569b56061"}
    assert stage_hashes(load_config(CONFIGS / "quick" / "exp11.yaml", [*then, recipe]), deps) == {
        "decompose": "221b92c90d45250e", "finetune.0": "bae3a97818bf6593", "finetune.1": "838735eaea90f1c7",
        "profile": "1fb99921a64a3efb"}


def test_choosing_on_validation_and_its_size_are_in_every_stage_hash():
    deps = {"exp01": "a"}
    path = CONFIGS / "quick" / "exp11.yaml"
    test = stage_hashes(load_config(path, ["select_on=test", "data.val_subset=null"]), deps)
    validation = stage_hashes(load_config(path, ["select_on=validation", "data.val_subset=null"]), deps)
    sized = stage_hashes(load_config(path, ["select_on=validation", "data.val_subset=500"]), deps)
    for name in test:
        assert len({test[name], validation[name], sized[name]}) == 3, f"stage {name}: {test[name]}, {validation[name]}"


def test_a_distillation_stage_runs_in_a_run_and_the_table_names_it(tmp_path):
    folder = tiny_configs(tmp_path / "configs")
    write_yaml(folder / "b04.yaml", {"extends": "base.yaml", "no": 4, "baseline": "b01",
                                     "train": {"epochs": 1}, "decompose": {"layers": [2, 3, 4], "bases": [4, 4, 3]},
                                     "finetune": [{"l2": 1.0, "kd": 0.5, "temperature": 3.0, "epochs": 1}]})
    write_yaml(folder / "b01.yaml", {"extends": "base.yaml", "no": 1, "train": {"epochs": 1}})
    b04 = run_with_dependencies(load_config(folder / "b04.yaml"), tmp_path / "runs", quiet=True)
    assert b04["finetune"][0]["kd"] == 0.5 and b04["finetune"][0]["temperature"] == 3.0
    result = runner.invoke(app, ["table", str(tmp_path / "runs")])
    row = next(line for line in result.output.splitlines() if line.startswith("|4|"))
    assert "kd 0.5x1 (T 3)" in row, row
