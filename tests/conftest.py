"""Shared fixtures: tiny experiment configs on synthetic data, written into a temp folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(2)

TINY_BASE = {
    "model": {"name": "tiny_cnn", "num_classes": 10},
    "data": {"name": "synthetic", "image_size": 16, "batch_size": 32, "test_batch_size": 128,
             "train_subset": 256, "test_subset": 128, "synthetic_size": 16},
    "train": {"epochs": 2, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0},
    "profile": {"input_size": [3, 16, 16], "batch": 4, "warmup": 1, "repeats": 5, "min_time_s": 0.0},
    "runtime": {"device": "cpu"},
}


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two spin against each other; one is faster and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_tiny_configs(folder: Path) -> Path:
    """A config folder: base.yaml, a baseline (t01), an expansion (t02) and a fine-tune on it (t03)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(folder / "base.yaml", TINY_BASE)
    write_yaml(folder / "t01.yaml", {"extends": "base.yaml", "no": 1, "group": 1, "remark": "original model"})
    write_yaml(folder / "t02.yaml", {"extends": "base.yaml", "no": 2, "group": 2, "baseline": "t01",
                                     "decompose": {"layers": [2, 3, 4], "scheme": "v1", "bases": [4, 4, 3]}})
    write_yaml(folder / "t03.yaml", {"extends": "base.yaml", "no": 3, "group": 2, "baseline": "t01", "parent": "t02",
                                     "finetune": [{"l2": 1.0, "epochs": 1}, {"ce": 1.0, "epochs": 1, "lr": 0.001}],
                                     "profile": {"enabled": False}})
    return folder


@pytest.fixture
def tiny_configs(tmp_path: Path) -> Path:
    return make_tiny_configs(tmp_path / "configs")


@pytest.fixture(autouse=True)
def own_latency_cache(tmp_path: Path, monkeypatch) -> Path:
    """Each test's own machine cache of latency times (LRX_CACHE_DIR): never the user's ~/.cache/lrx."""
    folder = tmp_path / "lrx-cache"
    monkeypatch.setenv("LRX_CACHE_DIR", str(folder))
    return folder
