"""Atomic writes keep the old file on failure; bad checkpoints give a UserError naming the file."""
import errno
import json
import os

import pytest
import torch

from lrx.base import files as checkpoint
from lrx.base.files import load_checkpoint, save_atomic, write_json_atomic
from lrx.base.errors import UserError


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_of_tensors_and_plain_containers(tmp_path):
    path = tmp_path / "a.ckpt"
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "history": [{"epoch": 1, "acc1": 50.0}],
           "rng": [{"cpu": torch.get_rng_state(), "cuda": []}], "best": None}
    save_atomic(obj, path)
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], obj["model"]["w"]), "tensor changed in a save/load round trip"
    assert back["history"] == obj["history"] and back["epoch"] == 3 and back["best"] is None, "plain values changed"
    assert torch.equal(back["rng"][0]["cpu"], obj["rng"][0]["cpu"]), "RNG state changed in a round trip"
    assert leftovers(tmp_path) == [], "a temporary file was left behind"


@pytest.mark.parametrize("fail_in", ["torch.save", "os.replace"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "a.ckpt"
    save_atomic({"epoch": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fail_in == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", disk_full)
    with pytest.raises(UserError) as err:
        save_atomic({"epoch": 2}, path)
    assert str(path) in str(err.value), f"the error does not name the file: {err.value}"
    assert os.strerror(errno.ENOSPC) in str(err.value), f"the error does not give the OS reason: {err.value}"
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1, "the previous checkpoint was not kept intact"
    assert leftovers(tmp_path) == [], "the temporary file was not removed after the failure"


def test_failed_json_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic({"status": "done"}, path)
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(UserError, match="metrics.json"):
        write_json_atomic({"status": "running"}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "done"}, "the previous JSON file was not kept"
    assert leftovers(tmp_path) == [], "the temporary file was not removed after the failure"


def test_json_is_written_whole(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json_atomic({"acc1": 83.14, "l2": None, "layers": [2, 3]}, path)
    assert json.loads(path.read_text()) == {"acc1": 83.14, "l2": None, "layers": [2, 3]}, "JSON content differs"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing", "not-a-mapping", "unsafe-object"])
def test_bad_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "stage0.ckpt"
    save_atomic({"model": {"w": torch.randn(64, 64)}, "epoch": 1}, path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    elif damage == "not-a-mapping":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"obj": UnsafeThing()}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value), f"{damage}: the error does not name the file: {err.value}"
    assert "\n" not in str(err.value), f"{damage}: the error is not one line: {err.value!r}"


class UnsafeThing:
    """An object weights_only loading must refuse."""


def test_a_raw_pickle_is_refused_in_one_line_without_torch_warnings(tmp_path, recwarn):
    import pickle as raw_pickle

    path = tmp_path / "raw.pt"
    path.write_bytes(raw_pickle.dumps({"model": [1, 2]}, protocol=4))
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(path)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)], "torch's protocol warning leaked"
