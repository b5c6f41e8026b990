"""Hostile and careless configs (issue 16): each is refused before anything runs, as one line naming the
file and the key, exit code 2, no traceback, nothing under runs/; the hostile sizes are refused quickly
and in bounded memory, never expanded."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lrx.factor import decomposition
from lrx.cli import app
from lrx.config.settings import MAX_SEED, load_config
from lrx.factor.decomposition import METHOD_OPTIONS
from lrx.base.yamlread import MAX_FILE_BYTES
from lrx.base.errors import UserError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

BASE = "extends: base.yaml\n"
DECOMPOSE = "baseline: t01\ndecompose:\n  layers: [2]\n  bases: [2]\n"
ALTERNATING = DECOMPOSE + "  method: alternating\n"


def laughs(indent: str) -> str:
    """A "billion laughs": 9 lists of 9 aliases of the list before, 9**9 strings once expanded, as a list
    (lines starting with ``indent``)."""
    lines = [f"{indent}- &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{indent}- &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


# label, the YAML of bad.yaml (beside the fixture's base.yaml and t01.yaml), --set overrides,
# the key the line must name (None: the whole file), what the line must say, whether it is a hostile size.
HOSTILE = [
    ("empty file", "", [], None, "is empty: a config needs at least", False),
    ("comment-only file", "# to do: fill in\n\n", [], None, "is empty: a config needs at least", False),
    ("baseline is the run itself", BASE + "name: bad\nbaseline: bad\n", [], "baseline", "names this run itself", False),
    ("baseline is the file itself", BASE + "baseline: bad\n", [], "baseline", "names this run itself", False),
    ("parent is the run itself", BASE + "name: bad\nbaseline: t01\nparent: bad\n", [], "parent",
     "names this run itself", False),
    ("second train: block", BASE + "train:\n  epochs: 1\ntrain:\n  lr: 0.1\n", [], "train",
     "appears twice, on lines 2 and 4", False),
    ("key twice in a block", BASE + "train:\n  epochs: 1\n  epochs: 3\n", [], "train.epochs",
     "appears twice, on lines 3 and 4", False),
    ("seed 2**64", BASE + f"seed: {2**64}\n", [], "seed", f"0..{2**32 - 1}", False),
    ("epochs 10**400", BASE + f"train:\n  epochs: {10**400}\n", [], "train.epochs", "must be <= 100000", False),
    ("warm-up 1e9 epochs", BASE + "train:\n  warmup_epochs: 1.0e9\n", [], "train.warmup_epochs",
     "must be <= 100000", False),
    ("lr overflows a float", BASE + f"train:\n  lr: {10**400}\n", [], "train.lr", "must be a finite number", False),
    ("image size 10**6", BASE + "data:\n  image_size: 1000000\n", [], "data.image_size", "must be <= 4096", False),
    ("batch size 10**9", BASE + "data:\n  batch_size: 1000000000\n", [], "data.batch_size", "must be <= 65536", False),
    ("test batch 10**9", BASE + "data:\n  test_batch_size: 1000000000\n", [], "data.test_batch_size",
     "must be <= 65536", False),
    ("profile channels", BASE + "profile:\n  input_size: [5000, 16, 16]\n", [], "profile.input_size.0",
     "must be <= 1024", False),
    ("profile height", BASE + "profile:\n  input_size: [3, 100000, 16]\n", [], "profile.input_size.1",
     "must be <= 4096", False),
    ("profile warm-up 10**400", BASE + f"profile:\n  warmup: {10**400}\n", [], "profile.warmup", "must be <= 1000",
     False),
    ("stage epochs 10**400", BASE + DECOMPOSE + f"finetune:\n  - {{ce: 1.0, epochs: {10**400}}}\n", [],
     "finetune.0.epochs", "must be <= 100000", False),
    ("run name of 300 characters", BASE + f"name: {'a' * 300}\n", [], "name", "at most 100 characters", False),
    ("5000-digit integer", BASE + "seed: 1" + "0" * 5000 + "\n", [], "seed", "characters long", True),
    ("file over the size limit", BASE + "remark: " + "x" * (MAX_FILE_BYTES + 10) + "\n", [], None,
     "is larger than 256 KiB", True),
    ("alias bomb in remark", BASE + "remark:\n" + laughs("  "), [], "remark", "anchors and aliases", True),
    ("alias bomb in no", BASE + "no:\n" + laughs("  "), [], "no", "anchors and aliases", True),
    ("alias bomb in decompose.options", BASE + ALTERNATING + "  options:\n    lam:\n" + laughs("      "), [],
     "decompose.options.lam", "anchors and aliases", True),
    ("5000 nested lists", BASE + "remark: " + "[" * 5000 + "]" * 5000 + "\n", [], "remark",
     "nested deeper than 32 levels", True),
    ("20000 values", BASE + "remark: [" + "1, " * 20000 + "]\n", [], "remark", "more than 10000 values", True),
    ("--set an index far past the list", BASE + DECOMPOSE + "finetune:\n  - {ce: 1.0}\n",
     ["finetune.99999999.epochs=1"], "finetune.99999999.epochs", "is beyond the end of finetune (1 entries", True),
    ("--set below a number", BASE, ["train.epochs.x.y=1"], "train.epochs.x.y",
     "train.epochs is a number, not a mapping", False),
    ("--set with an alias", BASE, ["remark=[&a [1, 2], *a]"], "remark", "anchors and aliases", False),
    ("unknown method option", BASE + ALTERNATING + "  options: {lamda: 0.1}\n", [], "decompose.options.lamda",
     "allowed: lam, lam_start, lam_growth, iterations, tol", False),
    ("options with method svd", BASE + DECOMPOSE + "  options: {lam: 0.1}\n", [], "decompose.options",
     "method svd takes no options", False),
    ("option not a number", BASE + ALTERNATING + "  options: {lam: big}\n", [], "decompose.options.lam",
     "must be a finite number, got 'big'", False),
    ("iterations 10**400", BASE + ALTERNATING + f"  options: {{iterations: {10**400}}}\n", [],
     "decompose.options.iterations", "must be an integer in 0..100000", False),
    ("lam_growth below 1", BASE + ALTERNATING + "  options: {lam_growth: 0.5}\n", [], "decompose.options.lam_growth",
     "must be >= 1", False),
    ("extends a missing file", "extends: nowhere.yaml\nno: 5\n", [], "extends", "no such file", False),
    ("extends a device", "extends: /dev/zero\nno: 5\n", [], "extends", "/dev/zero is not a regular file", True),
]


@pytest.mark.parametrize("label,text,sets,key,message,hostile", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_config_is_one_line_exit_2_and_writes_nothing(tiny_configs, tmp_path, label, text, sets, key, message,
                                                               hostile):
    path = tiny_configs / "bad.yaml"
    path.write_text(text)
    runs = tmp_path / "runs"
    args = ["run", str(path), "--runs-dir", str(runs), "--quiet"]
    for assignment in sets:
        args += ["--set", assignment]
    start = time.perf_counter()
    result = runner.invoke(app, args)
    seconds = time.perf_counter() - start
    output = result.output
    assert "Traceback" not in output and isinstance(result.exception, SystemExit), \
        f"{label}: not a clean exit: {result.exception!r}"
    assert result.exit_code == 2, f"{label}: exit code {result.exit_code}, output {output[:300]!r}"
    lines = output.strip().splitlines()
    assert len(lines) == 1, f"{label}: expected one line, got {len(lines)}: {output[:300]!r}"
    assert len(lines[0]) < 400, f"{label}: the line cuts long values, got {len(lines[0])} characters"
    source = "--set" if sets else str(path)  # an override's mistake is the command line's
    assert lines[0].startswith(f"lrx: error: {source}: "), f"{label}: the line names {source}: {lines[0]}"
    if key is not None:  # the key itself, or a list entry or value below it
        assert re.search(rf": {re.escape(key)}[.:]", lines[0]), f"{label}: the line names the key {key}: {lines[0]}"
    assert message in lines[0], f"{label}: the line says {message!r}: {lines[0]}"
    assert not runs.exists() or not any(runs.iterdir()), f"{label}: something was written under runs/"
    if hostile:  # refused in well under a second when idle; 5 s leaves room for a busy machine
        assert seconds < 5, f"{label}: took {seconds:.1f} s to refuse"


def test_every_repo_config_loads():
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(paths) >= 26, f"the repo's configs and configs/quick, found {len(paths)}"
    for path in paths:
        cfg = load_config(path)
        assert cfg.name == path.stem, f"{path} loads, named after its file"


def test_method_options_are_the_decomposition_options():
    assert METHOD_OPTIONS["alternating"] == tuple(decomposition.ALTERNATING_DEFAULTS), \
        "config.METHOD_OPTIONS names the options lrx.factor.decomposition.ALTERNATING_DEFAULTS gives defaults for"
    assert METHOD_OPTIONS["svd"] == (), "svd takes no options"


def test_alternating_options_load(tiny_configs):
    path = tiny_configs / "alt.yaml"
    path.write_text(BASE + ALTERNATING + "  options: {lam: 0.05, lam_start: null, lam_growth: 2, iterations: 50, "
                                         "tol: 1.0e-6}\n")
    options = load_config(path).decompose.options
    assert options == {"lam": 0.05, "lam_start": None, "lam_growth": 2, "iterations": 50, "tol": 1e-6}, \
        f"every alternating option, lam_start null, loads as written: {options}"


def test_a_file_that_only_extends_loads(tiny_configs):
    path = tiny_configs / "only.yaml"
    path.write_text(BASE)
    assert load_config(path).model.name == "tiny_cnn", "a file with only extends: is the base's settings"


def test_extends_without_a_path_is_refused(tiny_configs):
    path = tiny_configs / "null.yaml"
    path.write_text("extends:\nno: 3\n")
    with pytest.raises(UserError, match="must be the path of another YAML") as err:
        load_config(path)
    assert err.value.key == "extends" and err.value.file == str(path), f"names file and key: {err.value}"


def test_bounds_are_inclusive(tiny_configs):
    cfg = load_config(tiny_configs / "t01.yaml", [f"seed={MAX_SEED}", "train.epochs=100000", "data.image_size=4096",
                                                 "data.batch_size=65536", "profile.input_size=[1024, 4096, 4096]"])
    assert (cfg.seed, cfg.train.epochs, cfg.data.image_size) == (MAX_SEED, 100000, 4096), "the bounds themselves load"


def test_set_may_add_the_next_list_entry_only(tiny_configs):
    cfg = load_config(tiny_configs / "t03.yaml", ["finetune.2.ce=1"])
    assert len(cfg.finetune) == 3 and cfg.finetune[2].ce == 1.0, "index == length appends one stage"
    with pytest.raises(UserError, match=r"index 4 is beyond the end of finetune \(2 entries; the next new one is 2\)"):
        load_config(tiny_configs / "t03.yaml", ["finetune.4.ce=1"])


def test_messages_cut_huge_values(tiny_configs):
    path = tiny_configs / "long.yaml"
    path.write_text(BASE + "no: " + "x" * 100_000 + "\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert err.value.key == "no" and len(err.value.message) < 200 and "..." in err.value.message, \
        f"a 100 KB value is cut in the message: {str(err.value)[:300]}"
    path.write_text(BASE + "seed: 0x" + "f" * 900 + "\n")
    with pytest.raises(UserError, match=rf"got {str(16**900 - 1)[:8]}\.\.\. \(an integer of 1084 digits\)"):
        load_config(path)
