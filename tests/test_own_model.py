"""Your own model, weights and images in (issue 13): a torchvision model or a python: factory, the user's
checkpoint, an ImageFolder of PNGs, no baseline training (train.epochs: 0), end to end through `lrx run`."""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from typer.testing import CliRunner

from conftest import write_yaml
from lrx.cli import app
from lrx.config.settings import StageConfig, TrainConfig, load_config
from lrx.data.datasets import as_batches
from lrx.base.errors import UserError
from lrx.train.finetune import run_stage
from lrx.expansion.model import expand
from lrx.nn.models import build_model, load_user_weights
from lrx.pipeline.runner import stage_hashes
from lrx.train.baseline import evaluate, train_baseline
from test_data import write_image_folder

runner = CliRunner()


FACTORY = '''
import torch.nn as nn

def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


@pytest.fixture
def isolated_imports(monkeypatch):
    """sys.path and sys.modules as they were after the test (load_config adds a python: model's folder)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("own_net_"):
            del sys.modules[name]


def configs(folder: Path, model: str, checkpoint: Path, images: Path, layer: str) -> Path:
    common = {"model": {"name": model, "num_classes": 3},
              "data": {"name": "imagefolder", "root": str(images), "image_size": 32, "batch_size": 18,
                       "test_batch_size": 16, "workers": 0},
              "profile": {"input_size": [3, 32, 32], "batch": 2, "warmup": 0, "repeats": 5, "threads": 1},
              "runtime": {"device": "cpu"}}
    write_yaml(folder / "base.yaml", {**common, "no": 1, "remark": "my model",
                                      "model": {**common["model"], "checkpoint": str(checkpoint)},
                                      "train": {"epochs": 0}})
    return write_yaml(folder / "small.yaml", {**common, "no": 2, "baseline": "base",
                                              "decompose": {"layers": [layer], "scheme": "v2", "bases": [4]},
                                              "finetune": [{"l2": 1.0, "epochs": 1}]})


@pytest.mark.parametrize("kind", ["torchvision", "python"])
def test_own_model_checkpoint_and_image_folder_run_end_to_end(tmp_path, kind, isolated_imports, one_thread):
    images = write_image_folder(tmp_path / "images")
    folder = tmp_path / "configs"
    folder.mkdir()
    if kind == "torchvision":
        model_name, layer = "torchvision:resnet18", "layer1.0.conv1"
        user_model = torchvision.models.resnet18(num_classes=3)
    else:
        module = f"own_net_{uuid.uuid4().hex[:8]}"  # next to the config, not on sys.path
        (folder / f"{module}.py").write_text(FACTORY)
        model_name, layer = f"python:{module}:build", "2"
        sys.path.append(str(folder))
        user_model = build_model(model_name, 3)
        sys.path.remove(str(folder))
        del sys.modules[module]
    torch.manual_seed(7)
    for p in user_model.parameters():  # weights no fresh model has
        p.data.normal_(0, 0.05)
    ckpt = tmp_path / "mine.pt"
    torch.save(user_model.state_dict(), ckpt)

    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(configs(folder, model_name, ckpt, images, layer)), "--runs-dir",
                                 str(runs), "--quiet"])
    assert result.exit_code == 0, result.output

    saved = torch.load(runs / "base" / "model.pt", weights_only=True)
    assert saved["arch"] == model_name
    for key, value in user_model.state_dict().items():
        assert torch.equal(saved["model"][key], value), f"train.epochs 0 keeps the checkpoint's {key} unchanged"
    base = json.loads((runs / "base" / "metrics.json").read_text())
    assert base["stages"]["train"]["epochs"] == [], "no baseline training"
    assert 0 <= base["acc1"] <= 100 and base["macs"] > 0 and base["cpu_time_ms"] > 0, "row 1 evaluated and profiled"
    small = json.loads((runs / "small" / "metrics.json").read_text())
    assert small["status"] == "done" and small["acc1_before"] == base["acc1"]
    assert small["decompose"]["names"] == [layer] and small["macs"] < base["macs"]
    assert small["finetune"][0]["l2_after"] is not None

    table = runner.invoke(app, ["table", str(runs)])
    assert table.exit_code == 0, table.output
    rows = [line for line in table.output.splitlines() if line.startswith(("|1|", "|2|"))]
    assert len(rows) == 2 and f"{base['acc1']:.2f}" in rows[0], table.output


def test_a_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    model = build_model("tiny_cnn", 10)
    state = build_model("tiny_cnn", 10).state_dict()
    state.pop("0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["14.weight"] = torch.zeros(3, 128)  # the head of a 3-class model
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"missing keys 0\.bias \(1\); unexpected keys extra\.weight \(1\); "
                                        r"shape mismatches 14\.weight \(3, 128\) \(model: \(10, 128\)\) \(1\)") as err:
        load_user_weights(model, tmp_path / "bad.pt")
    assert err.value.key == "model.checkpoint"

    torch.save(model, tmp_path / "whole.pt")  # a pickled module, not weights
    with pytest.raises(UserError, match="weights only: save torch.save\\(model.state_dict"):
        load_user_weights(model, tmp_path / "whole.pt")
    with pytest.raises(UserError, match="no such file"):
        load_user_weights(model, tmp_path / "absent.pt")


@pytest.mark.parametrize("blob", [{1: torch.zeros(2)}, {"state_dict": {(1, 2): torch.zeros(2)}}, {"0.weight": 1}])
def test_a_checkpoint_that_is_no_state_dict_is_one_line_naming_it(tmp_path, blob):
    torch.save(blob, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="is not a state_dict") as err:
        load_user_weights(build_model("tiny_cnn", 10), tmp_path / "odd.pt")
    assert str(tmp_path / "odd.pt") in str(err.value) and err.value.key == "model.checkpoint", str(err.value)


def test_checkpoint_formats_load_the_same_weights(tmp_path):
    source = build_model("tiny_cnn", 10)
    state = source.state_dict()
    forms = {"plain": state, "lightning": {"state_dict": state, "epoch": 3},
             "lrx": {"model": state, "arch": "tiny_cnn", "num_classes": 10, "spec": None, "layers": []},
             "ddp": {f"module.{k}": v for k, v in state.items()}}
    for name, blob in forms.items():
        torch.save(blob, tmp_path / f"{name}.pt")
        model = build_model("tiny_cnn", 10)
        load_user_weights(model, tmp_path / f"{name}.pt")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values())), name
    torch.save({"model": state, "spec": {"scheme": "v2"}}, tmp_path / "expanded.pt")
    with pytest.raises(UserError, match="expanded model"):
        load_user_weights(build_model("tiny_cnn", 10), tmp_path / "expanded.pt")


def test_run_stage_evaluate_and_train_take_a_dataloader(tmp_path, one_thread):
    torch.manual_seed(0)
    teacher = build_model("tiny_cnn", 4).eval()
    student, report = expand(teacher, layers=[2], scheme="v2", ranks=[2])
    names = [layer["name"] for layer in report.layers]
    x, y = torch.randn(24, 3, 16, 16), torch.randint(0, 4, (24,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    expected = float(100 * (teacher(x).argmax(1) == y).float().mean())
    assert evaluate(teacher, loader) == pytest.approx(expected, abs=1e-9)
    assert evaluate(teacher, [(x[:10], y[:10]), (x[10:], y[10:])]) == pytest.approx(expected, abs=1e-9)

    result = run_stage(student, teacher, names, loader, loader, StageConfig(l2=1.0, epochs=2, lr=1e-2),
                       tmp_path / "stage.ckpt", quiet=True)
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert result["l2_after"] < result["l2_before"], "L2 fine-tuning on a DataLoader lowers the L2 norm"
    trained = train_baseline(build_model("tiny_cnn", 4), loader, loader, TrainConfig(epochs=1, lr=1e-3),
                             tmp_path / "train.ckpt", quiet=True)
    assert len(trained["epochs"]) == 1 and 0 <= trained["acc1"] <= 100
    with pytest.raises(UserError, match="iterable again"):
        evaluate(teacher, ((a, b) for a, b in loader))


def test_a_loaders_distributed_sampler_is_told_the_epoch():
    dataset = TensorDataset(torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 2, 2), torch.arange(8))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    batches = as_batches(DataLoader(dataset, batch_size=2, sampler=sampler))
    assert batches.shard(1, 2) is batches and batches.num_images is None, "the loader is this process's share"
    orders = []
    for epoch in (0, 1, 0):
        batches.set_epoch(epoch)
        orders.append(torch.cat([y for _, y in batches]).tolist())
    assert sampler.epoch == 0 and orders[0] == orders[2] != orders[1], "set_epoch reshuffles as DDP expects"
    assert len(orders[0]) == 4 and len(batches) == 2


def test_checkpoint_mistakes_are_found_before_anything_is_written(tmp_path, isolated_imports):
    images = write_image_folder(tmp_path / "images", per_class=2)
    folder = tmp_path / "configs"
    folder.mkdir()
    torch.save(build_model("tiny_cnn", 10).state_dict(), tmp_path / "ten.pt")  # 10 classes, the config has 3
    config = configs(folder, "tiny_cnn", tmp_path / "ten.pt", images, "2")
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(config), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "model.checkpoint" in result.output and "shape mismatches 14.weight (10, 128) (model: (3, 128))" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not runs.exists(), "one line, nothing written"
    write_yaml(folder / "base.yaml", {"model": {"name": "torchvision:resnet18", "num_classes": 3,
                                                "weights": "IMAGENET9K"}, "train": {"epochs": 0}})
    result = runner.invoke(app, ["run", str(folder / "base.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 2 and "has no weights 'IMAGENET9K'; allowed: IMAGENET1K_V1" in result.output, \
        result.output


def test_an_image_size_a_python_model_cannot_take_is_refused_before_anything_runs(tmp_path, isolated_imports):
    module = f"own_net_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "import torch.nn as nn\n"
        "def build(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 5), nn.MaxPool2d(4), nn.Conv2d(4, 4, 5), nn.Flatten(), nn.LazyLinear(num_classes))\n")
    config = write_yaml(tmp_path / "c.yaml", {"model": {"name": f"python:{module}:build"},
                                              "data": {"name": "synthetic", "image_size": 12},
                                              "profile": {"input_size": [3, 64, 64]}, "train": {"epochs": 0}})
    result = runner.invoke(app, ["run", str(config), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 2 and "data.image_size: the model does not run on an input of size (3, 12, 12)" \
        in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_stage_hashes_ignore_how_batches_are_read_and_count_a_checkpoint(tiny_configs):
    path = tiny_configs / "t01.yaml"
    base = stage_hashes(load_config(path), {})
    assert stage_hashes(load_config(path, ["data.stream=true", "data.workers=0"]), {}) == base, \
        "streaming gives the same batches: nothing to redo"
    assert stage_hashes(load_config(path, ["model.checkpoint=mine.pt"]), {})["train"] != base["train"]
    assert stage_hashes(load_config(path, ["model.checkpoint=null"]), {}) == base, "unset: runs made before keep their hash"


@pytest.mark.parametrize("model, data, key, message", [
    ({"name": "python:mynets"}, {}, "model.name", "must be python:<package.module>:<factory>"),
    ({"name": "torchvision:resnet-18"}, {}, "model.name", "must be torchvision:<model name>"),
    ({"name": "resnet18", "weights": "DEFAULT"}, {}, "model.weights", "go with a torchvision:<name> model"),
    ({"name": "torchvision:resnet18", "weights": "DEFAULT", "checkpoint": "a.pt"}, {}, "model.checkpoint",
     "model.weights and model.checkpoint both set the starting weights"),
    ({"name": "torchvision:resnet18", "init": "imagenet"}, {}, "model.init", "init imagenet is for registry models"),
    ({}, {"name": "torchvision:CIFAR-100"}, "data.name", "allowed: cifar10, fashion-mnist, synthetic, imagefolder, "
                                                         "torchvision:<Dataset>"),
    ({}, {"workers": -1}, "data.workers", "must be in 0..256"),
])
def test_own_model_and_data_keys_are_checked_when_loaded(tmp_path, model, data, key, message):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"name": "tiny_cnn", **model}, "data": data})
    with pytest.raises(UserError, match=message) as err:
        load_config(path)
    assert err.value.key == key and err.value.file == str(path)
