"""Config loading and validation: every bad input is one line naming the file and key, exit 2, nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lrx.cli import app
from lrx.config.settings import (Config, DataConfig, ProfileConfig, apply_override, load_config, parse_input_size,
                                 profile_input_size, size_text)
from lrx.pipeline.runner import stage_hashes
from lrx.base.errors import UserError

from conftest import TINY_BASE, write_yaml

runner = CliRunner()


def test_extends_merges_key_by_key(tiny_configs):
    cfg = load_config(tiny_configs / "t03.yaml")
    assert cfg.model.name == "tiny_cnn", "model comes from base.yaml"
    assert cfg.no == 3 and cfg.group == 2, "the `no:` key is a key, not YAML 1.1's boolean"
    assert cfg.finetune[0].l2 == 1.0 and cfg.finetune[1].lr == 0.001
    assert cfg.finetune[0].lr == 1e-4, "the seed's AdamW lr is the default"
    assert cfg.finetune[0].betas == [0.9, 0.999] and cfg.finetune[0].weight_decay == 0.01
    assert cfg.name == "t03", "the run name defaults to the file stem"


def test_seed_configs_load_with_seed_settings():
    root = Path(__file__).resolve().parents[1] / "configs"
    rows = {i: load_config(root / f"exp0{i}.yaml") for i in range(1, 10)}
    assert rows[2].decompose.layers == [2, 3, 4, 5] and rows[2].decompose.bases == [8, 8, 6, 4]
    assert rows[2].decompose.basis == "shared" and rows[2].decompose.method == "svd"
    assert not rows[2].decompose.decomposed and rows[6].decompose.decomposed
    assert rows[1].data.name == "cifar10" and rows[1].data.image_size == 224 and rows[1].data.batch_size == 64
    assert [(s.l2, s.epochs) for s in rows[3].finetune] == [(1.0, 20)]
    assert rows[4].parent == "exp03" and [(s.ce, s.epochs) for s in rows[4].finetune] == [(1.0, 10)]
    assert rows[9].parent == "exp06" and rows[9].finetune[0].epochs == 20, "row 9's CE is 20 epochs"
    for i in range(1, 10):
        assert rows[i].profile.input_size == [3, 224, 224], "the seed's rows time at 224, as trained, set explicitly"
        quick = load_config(root / "quick" / f"exp0{i}.yaml")
        assert quick.data.name == "fashion-mnist" and quick.profile.input_size is None, "quick rows: the data's size"


def test_the_profile_size_defaults_to_the_size_the_model_is_trained_at():
    """profile.input_size null (the default) is the data's images: 3 x data.image_size x data.image_size, the one
    size the MACs, the times and a latency target's plan use; quick rows time at 64 px, the seed's at 224."""
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in [f"exp{i:02d}" for i in range(1, 22)]:
        quick = load_config(root / "quick" / f"{name}.yaml")
        assert profile_input_size(quick) == (3, 64, 64), f"quick/{name} times at its training size"
        assert quick.to_dict()["profile"]["input_size"] == [3, 64, 64], "config.yaml records the size as resolved"
    for name in [f"exp{i:02d}" for i in range(1, 14)]:
        assert profile_input_size(load_config(root / f"{name}.yaml")) == (3, 224, 224), f"{name} keeps the seed's 224"
    assert profile_input_size(Config()) == (3, 224, 224), "the default data.image_size is 224"
    assert profile_input_size(Config(data=DataConfig(image_size=32))) == (3, 32, 32), "it follows data.image_size"
    given = Config(data=DataConfig(image_size=32), profile=ProfileConfig(input_size=[1, 40, 48]))
    assert profile_input_size(given) == (1, 40, 48), "a size given explicitly wins"


def test_the_profile_size_counts_in_the_hashes_as_resolved(tiny_configs):
    """A null size and the same size written out hash alike (no spurious redo); another size redoes the
    profile, and a latency target's plan (made at the profile's size) too."""
    explicit = load_config(tiny_configs / "t02.yaml")
    implicit = load_config(tiny_configs / "t02.yaml", ["profile.input_size=null"])
    assert explicit.profile.input_size == [3, 16, 16] and profile_input_size(implicit) == (3, 16, 16)
    assert stage_hashes(explicit, {"t01": "h"}) == stage_hashes(implicit, {"t01": "h"}), "same resolved size, same hashes"
    bigger = stage_hashes(load_config(tiny_configs / "t02.yaml", ["data.image_size=24", "profile.input_size=null"]),
                          {"t01": "h"})
    assert bigger["profile"] != stage_hashes(implicit, {"t01": "h"})["profile"], "a new size redoes the profile"
    target = ["decompose.scheme=v2", "decompose.bases=auto", "decompose.target={latency: 1.5}"]
    at_16 = stage_hashes(load_config(tiny_configs / "t02.yaml", target), {"t01": "h"})
    at_32 = stage_hashes(load_config(tiny_configs / "t02.yaml", target + ["profile.input_size=[3, 32, 32]"]), {"t01": "h"})
    assert at_16["decompose"] != at_32["decompose"], "a latency plan is made again at another profile size"
    weights_16 = stage_hashes(explicit, {"t01": "h"})
    weights_32 = stage_hashes(load_config(tiny_configs / "t02.yaml", ["profile.input_size=[3, 32, 32]"]), {"t01": "h"})
    assert weights_16["decompose"] == weights_32["decompose"], "explicit ranks do not depend on the profile size"


@pytest.mark.parametrize("text", ["3,abc", "3,224", "3,224,224,1", "0,16,16", "3,-1,16", "3,5000,16", "2000,16,16",
                                  "3,16,", "3, 16,1e3", ""])
def test_a_bad_input_size_option_names_the_option_and_the_allowed_values(text):
    with pytest.raises(UserError) as info:
        parse_input_size(text)
    assert "--input-size" in str(info.value) and "1 <= C <= 1024" in str(info.value) and "4096" in str(info.value), \
        str(info.value)
    assert parse_input_size("3, 224,224") == (3, 224, 224) and size_text((3, 224, 224)) == "3x224x224"


def test_override_sets_nested_and_list_keys(tiny_configs):
    cfg = load_config(tiny_configs / "t03.yaml", ["finetune.0.epochs=3", "data.image_size=20", "seed=7"])
    assert (cfg.finetune[0].epochs, cfg.data.image_size, cfg.seed) == (3, 20, 7)
    raw = {}
    apply_override(raw, "decompose.bases=[1, 2]")
    assert raw == {"decompose": {"bases": [1, 2]}}


BAD = [
    ("unknown key", {"epochz": 3}, "epochz", "unknown key"),
    ("unknown nested key", {"train": {"lrr": 0.1}}, "train.lrr", "unknown key"),
    ("wrong type", {"train": {"epochs": "ten"}}, "train.epochs", "expected an integer"),
    ("bad choice", {"data": {"name": "imagenet"}}, "data.name", "allowed: cifar10, fashion-mnist, synthetic"),
    ("negative epochs", {"train": {"epochs": -1}}, "train.epochs", "must be >= 0"),
    ("negative warm-up", {"train": {"warmup_epochs": -0.5}}, "train.warmup_epochs", "must be >= 0"),
    ("negative stage epochs", {"baseline": "t01", "decompose": {"layers": [2], "bases": [2]},
                               "finetune": [{"ce": 1.0, "epochs": -2}]}, "finetune.0.epochs", "must be >= 0"),
    ("bases length", {"baseline": "t01", "decompose": {"layers": [2, 3], "bases": [4]}}, "decompose.bases",
     "has 1 entries but decompose.layers has 2"),
    ("rank below 1", {"baseline": "t01", "decompose": {"layers": [2], "bases": [0]}}, "decompose.bases.0", "out of range; allowed 1.."),
    ("missing baseline", {"baseline": "nosuchrun", "decompose": {"layers": [2], "bases": [2]}}, "baseline",
     "no config"),
    ("layer beyond model", {"baseline": "t01", "decompose": {"layers": [9], "bases": [2]}}, "decompose.layers.0",
     "has 4 conv layers"),
    ("rank above max", {"baseline": "t01", "decompose": {"layers": [2], "scheme": "v2", "bases": [999]}},
     "decompose.bases.0", "maximum"),
    ("image too small", {"model": {"name": "alexnet_cifar10"}, "data": {"image_size": 32}}, "data.image_size",
     "at least 63x63"),
    ("bad run name", {"name": "../escape"}, "name", "run name"),
    ("order with scheme v1", {"baseline": "t01", "decompose": {"layers": [2], "bases": [2], "order": "hv"}},
     "decompose.order", "scheme v2's choice"),
    ("auto without target", {"baseline": "t01", "decompose": {"layers": [2], "bases": "auto"}}, "decompose.target",
     "bases: auto needs a target {speedup: X}"),
    ("speedup not above 1", {"baseline": "t01", "decompose": {"layers": [2], "bases": "auto",
                                                              "target": {"speedup": 0.5}}},
     "decompose.target.speedup", "must be a number > 1, got 0.5"),
    ("unknown order", {"baseline": "t01", "decompose": {"layers": [2], "scheme": "v2", "bases": [2], "order": "hh"}},
     "decompose.order", "allowed: vh, hv, auto"),
    ("kd temperature 0", {"baseline": "t01", "decompose": {"layers": [2], "bases": [2]},
                          "finetune": [{"kd": 1.0, "temperature": 0}]}, "finetune.0.temperature", "must be > 0"),
    ("negative kd", {"baseline": "t01", "decompose": {"layers": [2], "bases": [2]},
                     "finetune": [{"ce": 1.0, "kd": -1.0}]}, "finetune.0", "loss weights must be >= 0"),
    ("no loss", {"baseline": "t01", "decompose": {"layers": [2], "bases": [2]}, "finetune": [{"epochs": 1}]},
     "finetune.0", "needs l2 > 0, ce > 0 or kd > 0"),
    ("kd without an expansion", {"finetune": [{"kd": 1.0}]}, "finetune", "needs an expanded model"),
]


# Mistakes that were found only after the baseline trained (issue 16): now before anything is written.
BAD += [
    ("unknown model", {"model": {"name": "resnet99"}}, "model.name", "unknown model 'resnet99'; allowed:"),
    ("input channels", {"profile": {"input_size": [1, 16, 16]}}, "profile.input_size", "does not run on an input"),
    ("unreachable target", {"baseline": "t01", "decompose": {"layers": [2, 3], "scheme": "v2", "bases": "auto",
                                                             "target": {"speedup": 1e6}}},
     "decompose.target.speedup", "best reachable"),
    ("depthwise for v1", {"baseline": "t01", "model": {"name": "mobilenet_v2"}, "data": {"image_size": 32},
                          "profile": {"input_size": [3, 32, 32]}, "decompose": {"layers": [2], "bases": [2]}},
     "decompose.layers.0", "groups=32"),
    ("depthwise for auto v2", {"baseline": "t01", "model": {"name": "mobilenet_v2"}, "data": {"image_size": 32},
                               "profile": {"input_size": [3, 32, 32]},
                               "decompose": {"layers": [2], "scheme": "v2", "bases": "auto", "target": {"speedup": 2}}},
     "decompose.layers.0", "groups=32"),
    ("1x1 for v2", {"baseline": "t01", "model": {"name": "resnet18"}, "data": {"image_size": 32},
                    "profile": {"input_size": [3, 32, 32]},
                    "decompose": {"layers": ["layer2.0.downsample.0"], "scheme": "v2", "bases": [2]}},
     "decompose.layers.0", "1x1 kernel"),
]



@pytest.mark.parametrize("label,patch,key,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tiny_configs, tmp_path, label, patch, key, message):
    path = write_yaml(tiny_configs / "bad.yaml", {"extends": "base.yaml", **patch})
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 2, f"{label}: exit code {result.exit_code}, output {result.output!r}"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, f"{label}: expected one line, got {lines}"
    assert str(path) in lines[0] and key in lines[0] and message in lines[0], f"{label}: {lines[0]}"
    assert "Traceback" not in result.output
    assert not runs.exists() or not any(runs.iterdir()), f"{label}: something was written under runs/"


def test_unreadable_yaml_names_file_and_line(tiny_configs):
    path = tiny_configs / "broken.yaml"
    path.write_text("model:\n  name: [unclosed\n")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "not valid YAML" in result.output and str(path) in result.output


def test_yaml_that_builds_python_objects_is_refused(tiny_configs):
    path = tiny_configs / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)


def test_missing_file_is_a_user_error(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_help_lists_the_subcommands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "train", "decompose", "finetune-l2", "finetune-ce", "profile", "table", "plot"):
        assert command in result.output, f"--help lists {command}"
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and len(sub.output) > 100, f"{command} --help has help text"


def test_base_tiny_is_valid(tiny_configs):
    """The fixture configs themselves pass validation (so the BAD cases fail for their own reason)."""
    assert load_config(tiny_configs / "t02.yaml").decompose.bases == [4, 4, 3]
    assert TINY_BASE["model"]["name"] == "tiny_cnn"


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("3E-4", 3e-4), ("1.e-3", 1e-3), (".5", 0.5), ("2e+1", 20.0)])
def test_every_float_form_is_a_number_in_files_and_in_set(tiny_configs, text, value):
    path = tiny_configs / "lr.yaml"
    path.write_text(f"extends: base.yaml\ntrain:\n  lr: {text}\n")
    assert load_config(path).train.lr == value, f"lr: {text} in a file"
    assert load_config(tiny_configs / "t01.yaml", [f"train.lr={text}"]).train.lr == value, f"--set train.lr={text}"
