"""`lrx export` writes atomically and only where it may: a failed write keeps the previous file, and a
directory, a device or FIFO, a run's own folder or a name the OS refuses is one line, exit 2."""
from __future__ import annotations

import errno
import os
import resource
import signal

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lrx.base.errors import UserError
from lrx.base.files import is_temp_file
from lrx.cli import app
from lrx.nn.models import tiny_cnn
from lrx.output import export
from lrx.output.export import FORMATS, export_model
from test_export import saved_run

PREVIOUS = b"the previous good export\n"


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, f"one line, got: {result.output!r}"
    return lines[0]


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if is_temp_file(p.name)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_write_that_fails_half_way_keeps_the_previous_file(tmp_path, monkeypatch, fmt):
    torch.manual_seed(0)
    run, _ = saved_run(tmp_path, tiny_cnn())
    out = tmp_path / "out" / "model.bin"
    out.parent.mkdir()
    out.write_bytes(PREVIOUS)

    def fails_half_way(plain, x, destination):
        if isinstance(destination, (str, os.PathLike)):  # onnx writes by name
            with open(destination, "wb") as f:
                f.write(b"half of a model")
        else:
            destination.write(b"half of a model")
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setitem(export.WRITERS, fmt, fails_half_way)
    result = CliRunner().invoke(app, ["export", str(run.path), "--format", fmt, "-o", str(out)])
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert str(out) in line and os.strerror(errno.EFBIG) in line, f"{fmt}: names the file and the OS's reason: {line}"
    assert out.read_bytes() == PREVIOUS, f"{fmt}: the previous file is unchanged"
    assert leftovers(out.parent) == [], f"{fmt}: no temporary file is left"


def test_a_file_size_limit_keeps_the_previous_file_in_every_format(tmp_path):
    """The real writers under `ulimit -f` (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write fails with EFBIG)."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()  # ~150 KB in every format
    paths = {fmt: tmp_path / f"model.{fmt}" for fmt in FORMATS}
    for path in paths.values():
        path.write_bytes(PREVIOUS)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    errors = {}
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        for fmt, path in paths.items():
            try:
                export_model(model, path, fmt, (3, 16, 16))
            except UserError as err:
                errors[fmt] = str(err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    for fmt, path in paths.items():
        assert fmt in errors and str(path) in errors[fmt] and "File too large" in errors[fmt], \
            f"{fmt}: one error naming the file and the reason: {errors.get(fmt)}"
        assert path.read_bytes() == PREVIOUS, f"{fmt}: the previous file is unchanged"
    assert leftovers(tmp_path) == [], "no temporary file is left"


def test_a_good_export_replaces_the_previous_file(tmp_path):
    torch.manual_seed(0)
    run, expanded = saved_run(tmp_path, tiny_cnn())
    out = tmp_path / "model.pt"
    out.write_bytes(PREVIOUS)
    result = CliRunner().invoke(app, ["export", str(run.path), "--format", "state-dict", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert set(torch.load(out, weights_only=True)) == set(export.to_plain(expanded).state_dict())
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["a directory", "the run's own model file", "a new file in the run directory",
                                   "a FIFO", "a name too long", "a folder that does not exist"])
def test_outputs_an_export_may_not_write_are_refused_in_one_line(tmp_path, where):
    torch.manual_seed(0)
    run, _ = saved_run(tmp_path, tiny_cnn())
    own = run.model_path("decompose")
    before = own.read_bytes()
    out = {"a directory": tmp_path, "the run's own model file": own,
           "a new file in the run directory": run.path / "export.onnx", "a FIFO": tmp_path / "fifo",
           "a name too long": tmp_path / ("x" * 300 + ".pt"),
           "a folder that does not exist": tmp_path / "missing" / "model.pt"}[where]
    if where == "a FIFO":
        os.mkfifo(out)
    # Writing into a FIFO nobody reads would block for ever: if the refusal ever broke, fail instead of hanging.
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"{where}: the export blocked"))
    signal.alarm(120)
    try:
        result = CliRunner().invoke(app, ["export", str(run.path), "--format", "state-dict", "-o", str(out)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exit_code == 2, f"{where}: {result.output}"
    line = one_line(result)
    assert str(out) in line, f"{where}: the line names the output: {line}"
    words = {"a directory": "is a directory", "the run's own model file": "inside the run directory",
             "a new file in the run directory": "inside the run directory", "a FIFO": "not a regular file",
             "a name too long": "File name too long", "a folder that does not exist": "is not a folder"}[where]
    assert words in line, f"{where}: says why: {line}"
    assert own.read_bytes() == before, "the run's model file is untouched"
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "expanded.pt", "metrics.json"], \
        "nothing is written into the run directory"
    if where == "a FIFO":
        assert not out.is_file() and out.exists(), "the FIFO is left as it is"
