"""Bad image folders: one line naming the file or folder, exit code 2, and no run folder left behind.

Unreadable images (corrupt, empty, truncated, decompression bombs) on both reading paths and in worker
processes; mistakes in the folders (missing, an empty class, a validation class the training split lacks,
symlinked folders that would change labels) found before a run starts; files that are not regular files
(a FIFO named like an image) skipped, not opened.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import write_yaml
from lrx.base.errors import UserError
from lrx.cli import app
from lrx.config.settings import load_config
from lrx.data.datasets import check_data, image_folder, load_data, subset_indices
from lrx.data.splits import carve
from test_data import write_image_folder

runner = CliRunner()


def png_header(width: int, height: int) -> bytes:
    """A PNG of ``width`` x ``height`` pixels that holds no pixel data: what PIL reads before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def spoil(images: Path, kind: str) -> Path:
    """Make one image of the folder unreadable; returns its path."""
    path = images / "train" / "dog" / "1.png"
    data = path.read_bytes()
    if kind == "corrupt":
        path.write_bytes(b"not a png")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bomb":  # 10^10 pixels: over PIL's limit, refused before a byte of pixels is read
        path.write_bytes(png_header(100_000, 100_000))
    elif kind == "truncated-jpeg":
        path.unlink()
        path = path.with_suffix(".jpg")
        pixels = np.random.default_rng(0).integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:-200])
    return path


def config(folder: Path, images: Path, name: str = "c", select_on: str = "test", **data) -> Path:
    """A config reading the folder; ``select_on: test`` by default: the training images are all of train/."""
    settings = {"name": "imagefolder", "root": str(images), "image_size": 16, "batch_size": 4, "test_batch_size": 4,
                "workers": 0, **data}
    return write_yaml(folder / f"{name}.yaml", {"model": {"name": "tiny_cnn", "num_classes": 3}, "data": settings,
                                                "train": {"epochs": 0}, "profile": {"enabled": False}, "seed": 5,
                                                "select_on": select_on})


def one_line(err: UserError) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, f"one line, no traceback: {text!r}"
    return text


# ---------------------------------------------------------------- unreadable images, on every reading path

READ_PATHS = [{"stream": False, "workers": 0}, {"stream": False, "workers": 2}, {"stream": True, "workers": 2}]


@pytest.mark.parametrize("kind", ["corrupt", "empty", "truncated", "bomb", "truncated-jpeg"])
@pytest.mark.parametrize("reading", READ_PATHS, ids=["memory", "memory-workers", "stream-workers"])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path, kind, reading):
    images = write_image_folder(tmp_path / "images", per_class=2, size=12)
    bad = spoil(images, kind)
    cfg = load_config(config(tmp_path, images, **reading))
    with pytest.raises(UserError, match="cannot read image") as err:
        train, _ = load_data(cfg)
        list(train)  # streamed: decoded here, in the workers
    assert str(bad) in one_line(err.value), f"the message names {bad}"


@pytest.mark.parametrize("kind", ["corrupt", "empty", "truncated", "bomb"])
def test_an_unreadable_image_is_found_before_the_run(tmp_path, kind):
    images = write_image_folder(tmp_path / "images", per_class=2, size=12)
    bad = spoil(images, kind)
    path = config(tmp_path, images, workers=2)
    with pytest.raises(UserError, match="cannot read image") as err:
        check_data(load_config(path))
    assert str(bad) in one_line(err.value) and err.value.file == str(path), "names the image and the config"


def test_check_data_verifies_only_the_images_a_run_reads(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=4, size=12)
    bad = str(spoil(images, "corrupt"))
    with pytest.raises(UserError, match="cannot read image"):
        check_data(load_config(config(tmp_path, images)))
    samples = [path for path, _ in image_folder(images, 16, "train").samples]
    seed = next(seed for seed in range(50) if bad not in [samples[i] for i in subset_indices(12, 2, seed).tolist()])
    cfg = load_config(config(tmp_path, images, train_subset=2), [f"seed={seed}"])
    assert check_data(cfg) == [], "the bad image is not in the subset the run reads: nothing to refuse"
    # With validation images held out of train/, those are read too: refused when the bad one is among them.
    cfg = load_config(config(tmp_path, images, select_on="validation", train_subset=2, val_subset=3))

    def read(seed):
        train, val = carve(12, cfg.data, seed)
        return {samples[i] for i in train.tolist()}, {samples[i] for i in val.tolist()}

    seed = next(seed for seed in range(50) if bad not in set().union(*read(seed)))
    assert check_data(load_config(cfg.path, [f"seed={seed}"])) == [], "neither split reads the bad image"
    seed = next(seed for seed in range(50) if bad in read(seed)[1])
    with pytest.raises(UserError, match="cannot read image"):
        check_data(load_config(cfg.path, [f"seed={seed}"]))


# ---------------------------------------------------------------- through the CLI: one line, exit 2, nothing written


def damage(images: Path, mistake: str) -> str:
    """Make one mistake in an image folder; returns what the message must name."""
    if mistake in ("corrupt", "empty", "truncated", "bomb"):
        return str(spoil(images, mistake))
    if mistake == "missing":
        return "does not exist"
    if mistake == "empty-class":
        for path in (images / "train" / "dog").iterdir():
            path.unlink()
        return str(images / "train" / "dog")
    if mistake == "unknown-val-class":
        (images / "val" / "zebra").mkdir()
        (images / "val" / "zebra" / "0.png").write_bytes((images / "val" / "cat" / "0.png").read_bytes())
        return "zebra"
    if mistake == "link-up":  # every class's images under cat
        (images / "train" / "cat" / "up").symlink_to("..")
        return str(images / "train" / "cat" / "up")
    if mistake == "link-loop":  # a class of every image
        (images / "train" / "c2loop").symlink_to(".")
        return str(images / "train" / "c2loop")
    if mistake == "link-outside":
        elsewhere = write_image_folder(images.parent / "elsewhere", per_class=2, size=12)
        (images / "train" / "eel").rename(images.parent / "eel")
        (images / "train" / "eel").symlink_to(elsewhere / "train" / "eel")
        return str(images / "train" / "eel")
    if mistake == "link-other-class":  # dog's images labelled cat too
        (images / "train" / "cat" / "more").symlink_to(images / "train" / "dog")
        return str(images / "train" / "cat" / "more")
    raise AssertionError(mistake)


MISTAKES = ["corrupt", "empty", "truncated", "bomb", "missing", "empty-class", "unknown-val-class", "link-up",
            "link-loop", "link-outside", "link-other-class"]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_bad_data_is_one_line_exit_2_and_no_run_folder(tmp_path, mistake):
    images = write_image_folder(tmp_path / "images", per_class=2, size=12)
    named = damage(images, mistake)
    path = config(tmp_path, images if mistake != "missing" else tmp_path / "nowhere", name="row", workers=2)
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, f"one line: {result.output}"
    assert named in lines[0] and str(path) in lines[0], f"names {named!r} and the config file: {lines[0]}"
    assert not (runs / "row").exists(), "no run folder: nothing for `lrx table` to list"


def test_a_missing_data_root_says_where_it_came_from(tmp_path, monkeypatch):
    path = config(tmp_path, tmp_path / "nowhere")
    monkeypatch.setenv("LRX_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match=f"data folder {tmp_path / 'elsewhere'} does not exist.*LRX_DATA") as err:
        check_data(load_config(path))
    assert err.value.file == str(path) and err.value.key == "data.root"
    with pytest.raises(UserError, match=f"{tmp_path / 'flag'} does not exist.*--data-root"):
        check_data(load_config(path), str(tmp_path / "flag"))


# ---------------------------------------------------------------- symlinks that keep labels, special files


def test_symlinks_that_keep_labels_are_followed(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=2, size=12)
    train = images / "train"
    (train / "cat" / "also").symlink_to(train / "cat" / "sub", target_is_directory=True)
    (train / "cat" / "sub").mkdir()
    (train / "cat" / "0.png").rename(train / "cat" / "sub" / "0.png")  # cat: 1.png, sub/0.png, also/ -> sub
    (train / "cat" / "dog-copy.png").symlink_to(train / "dog" / "0.png")  # a symlinked file is an image
    (images / "val" / "cat").rename(tmp_path / "val-cat")
    (images / "val" / "cat").symlink_to(images / "val" / "dog")  # a class folder linking inside its split
    found = image_folder(images, 16, "train")
    labels = {os.path.relpath(path, train): label for path, label in found.samples}
    assert labels == {"cat/1.png": 0, "cat/also/0.png": 0, "cat/dog-copy.png": 0, "cat/sub/0.png": 0,
                      "dog/0.png": 1, "dog/1.png": 1, "eel/0.png": 2, "eel/1.png": 2}, labels
    val = image_folder(images, 16, "test")
    assert sorted(label for _, label in val.samples) == [0, 1, 2], "val/cat -> val/dog: dog's image under both labels"
    linked = tmp_path / "linked"
    linked.symlink_to(images)  # data.root itself a link: read where it points
    assert len(image_folder(linked, 16, "train")) == 8


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_named_like_an_image_is_skipped_and_counted(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=2, size=12)
    fifo = images / "train" / "cat" / "x.png"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    (images / "train" / "cat" / "gone.png").symlink_to(tmp_path / "no-such-file.png")
    found = image_folder(images, 16, "train")
    assert str(fifo) not in [path for path, _ in found.samples] and len(found) == 6, "only regular files are images"
    assert sorted(found.skipped) == sorted([str(images / "train" / "cat" / "gone.png"), str(fifo)])
    path = config(tmp_path, images, name="row")
    notes = check_data(load_config(path))
    assert len(notes) == 1 and "skipped 2 files" in notes[0] and str(fifo) in notes[0], notes
    train, _ = load_data(load_config(path))
    assert train.images.shape[0] == 6, "the run reads the six images"
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "skipped 2 files" in result.output and (tmp_path / "runs" / "row" / "metrics.json").exists()
