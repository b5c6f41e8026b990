"""examples/own_model (README, "Compress your own model"): its configs are valid against torchvision's resnet18
and the checkpoint train_own.py writes, and make_data.py's folder reads back in lrx with its labels."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torchvision

from lrx.config.settings import load_config
from lrx.data.datasets import image_folder
from lrx.base.errors import UserError
from lrx.pipeline.runner import configs_to_run

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_model"


@pytest.mark.parametrize("folder", [EXAMPLE, EXAMPLE / "tiny"], ids=["full", "tiny"])
def test_own_model_configs_check_against_resnet18_and_its_checkpoint(folder, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # run.sh runs lrx in its work folder: the configs' paths are relative to it
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), "my_resnet18.pt")
    fast = load_config(folder / "fast.yaml")
    configs = configs_to_run(fast)  # every check that needs the model (checkpoint keys, layers), shared settings
    assert [c.path for c in configs] == [str(folder / "original.yaml"), str(folder / "fast.yaml")], \
        "fast.yaml builds on the original.yaml beside it"
    original = configs[0]
    assert original.train.epochs == 0 and original.model.checkpoint == "my_resnet18.pt", "row 1 is the checkpoint"
    assert fast.decompose.scheme == "v2" and fast.decompose.bases == "auto" and fast.decompose.layers == ["auto"]
    assert fast.profile.threads == original.profile.threads == 2, "both rows timed alike"
    auto = load_config(folder / "fast_auto.yaml")
    assert [c.path for c in configs_to_run(auto)] == [str(folder / "original.yaml"), str(folder / "fast_auto.yaml")]
    assert auto.decompose.scheme == "auto" and auto.decompose.target == fast.decompose.target, \
        "row 3 asks row 2's target with scheme auto"
    assert auto.finetune == fast.finetune and auto.profile == fast.profile, "rows 2 and 3 differ only in the scheme"


def test_own_model_configs_refuse_a_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="my_resnet18.pt"):
        configs_to_run(load_config(EXAMPLE / "original.yaml"))


def test_make_data_writes_an_image_folder_lrx_reads_with_its_labels(tmp_path):
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLE / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.arange(12) % 10
    make_data.write_split(images, labels, 12, 28, tmp_path / "train", seed=0)
    make_data.write_split(images, labels, 5, 28, tmp_path / "val", seed=1)
    read = image_folder(tmp_path, 28, "train")
    assert len(read) == 12 and len(image_folder(tmp_path, 28, "test")) == 5
    assert read.classes == sorted(make_data.CLASSES), "every class folder exists, found in ImageFolder's order"
    for path, label in read.samples:
        i = int(Path(path).stem)
        assert read.classes[label] == make_data.CLASSES[int(labels[i])], f"{path} is in its label's folder"
    pixels, _ = read[[Path(p).stem for p, _ in read.samples].index("00003")]
    assert torch.equal(pixels, images[3]), "at the native size the PNG holds the image exactly"


def test_readme_shows_the_commands_run_sh_runs_at_full_size():
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    section = readme.split("## Compress your own model", 1)[1].split("\n## ", 1)[0]
    shown = section.split("```sh\n", 1)[1].split("```", 1)[0].strip().splitlines()
    script = (EXAMPLE / "run.sh").read_text()
    settings = next(line for line in script.splitlines() if line.strip().startswith("work=work "))
    full = dict(re.findall(r"(\w+)=(?:\$\{\w+:-)?([^\s}]+)", settings))  # configs=.., TRAIN=2000, ...
    run = []
    for line in script.splitlines():
        if line.startswith(("python ", "lrx ", "[ ")):
            command = line.split(" || ", 1)[-1].replace('"', "")
            run.append(re.sub(r"\$(\w+)", lambda m: full[m.group(1)], command))
    assert shown == run, "README's commands are run.sh's at full size, in its order"
