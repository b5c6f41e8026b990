"""Hostile and damaged files: metrics.json, config.yaml, model files, locks, the latency cache, export outputs
and image folders. Each starts from the finished runs t01, t02, t03 (the fixture) where it needs them."""
from __future__ import annotations

import json
import os
import pickle
import subprocess

import yaml

from harness import LRX, Case, Workspace, env, metrics, model_digest, refusal_problem, tail, temp_files
from cases_config import Evil, torch_save


def finished(category: str, name: str, args, setup=None, rc=2, says=(), unchanged="runs", check=None,
             timeout=300) -> Case:
    return Case(category, name, args, setup=setup, rc=rc, says=says, unchanged=unchanged, check=check,
                needs_fixture=True, timeout=timeout)


def write(rel: str, data) -> callable:
    """A setup that writes ``data`` (bytes, text or JSON-able) to ``runs/<rel>``."""
    def setup(ws: Workspace):
        path = ws.runs / rel
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif isinstance(data, str):
            path.write_text(data)
        else:
            path.write_text(json.dumps(data))
    return setup


def replace_with_folder(rel: str):
    def setup(ws: Workspace):
        path = ws.runs / rel
        path.unlink()
        path.mkdir()
    return setup


def no_pwned(ws, result):
    return "the pickle's code ran (pwned exists)" if (ws.path / "pwned").exists() else None


def edit_model(rel: str, **changes):
    """A setup that rewrites a model file's entries (arch, num_classes, spec, ...)."""
    def setup(ws: Workspace):
        import torch  # local: only these cases need it
        path = ws.runs / rel
        blob = torch.load(path, map_location="cpu", weights_only=True)
        blob.update(changes)
        torch.save(blob, path)
    return setup


def redone_and_same(stage_file: str):
    """The run redid the damaged stage: it says so in its log, and its final model equals the fixture's."""
    def check(ws: Workspace, result):
        log = (ws.runs / stage_file.split("/")[0] / "log.txt").read_text(errors="replace")
        if "does not load" not in log:
            return f"the log does not name the damaged file: {tail(log)}"
        if model_digest(ws.runs / stage_file) != model_digest(ws.fixture / "runs" / stage_file):
            return "the redone model differs from the uninterrupted run's"
        return None
    return check


def metrics_cases() -> list[Case]:
    run01 = ["run", "cfg/t01.yaml", "--runs-dir", "runs"]
    out = []
    damaged = {
        "metrics-truncated": b'{"stages": {"train": {"ha',
        "metrics-a-list": [1, 2],
        "metrics-stages-string": {"stages": "done"},
        "metrics-stage-without-hash": {"stages": {"train": {}}},
        "metrics-deep": "[" * 100_000 + "]" * 100_000,
        "metrics-not-utf8": b'{"status": "\xff"}',
        "metrics-running-list": {"stages": {}, "running": [1]},
    }
    for name, data in damaged.items():
        out.append(finished("files", name, run01, setup=write("t01/metrics.json", data), says=["metrics.json"]))
    out.append(finished("files", "metrics-huge", run01, says=["metrics.json"],
                        setup=write("t01/metrics.json", b'{"a": "' + b"x" * (17 * 2**20) + b'"}')))
    out.append(finished("files", "metrics-folder", run01, setup=replace_with_folder("t01/metrics.json"),
                        says=["metrics"]))

    # a stage name lrx never writes
    def bogus_stage(ws):
        m = metrics(ws.runs, "t01")
        m["stages"]["bogus"] = {"hash": "x"}
        (ws.runs / "t01" / "metrics.json").write_text(json.dumps(m))
    out += [
        finished("files", "bogus-stage-run", run01, setup=bogus_stage, says=["metrics.json"]),
        finished("files", "bogus-stage-export", ["export", "runs/t01", "--format", "state-dict", "-o", "out.pt"],
                 setup=bogus_stage, says=["t01"]),
        finished("files", "bogus-stage-clean-keep-final", ["clean", "runs", "--keep-final"], setup=bogus_stage,
                 rc=0, unchanged=None),
        finished("files", "bogus-stage-table", ["table", "runs"], setup=bogus_stage, rc=0),
    ]
    # the table shows damaged runs as such and never crashes
    out += [
        finished("files", "table-acc-string", ["table", "runs"], setup=write("t01/metrics.json",
                 {"stages": {}, "acc1": "high", "macs": [1], "params": {"a": 1}, "status": "done"}), rc=0),
        finished("files", "table-nan-values", ["table", "runs", "--format", "json"],
                 setup=write("t02/metrics.json", '{"stages": {}, "acc1": NaN, "macs": Infinity, "status": "done"}'),
                 rc=0),
        finished("files", "table-config-garbage", ["table", "runs", "--format", "csv"],
                 setup=write("t02/config.yaml", b"\x00\xff: [unclosed"), rc=0),
        finished("files", "plot-damaged", ["plot", "runs", "-o", "p.png"],
                 setup=write("t01/metrics.json", {"stages": {}, "acc1": "x", "macs": -5}), rc=0, unchanged=None),
    ]
    return out


def model_file_cases() -> list[Case]:
    run01 = ["run", "cfg/t01.yaml", "--runs-dir", "runs"]
    run03 = ["run", "cfg/t03.yaml", "--runs-dir", "runs"]
    out = []
    for name, make in {
        "model-truncated": lambda p: p.write_bytes(p.read_bytes()[:200]),
        "model-random-bytes": lambda p: p.write_bytes(os.urandom(5000)),
        "model-pickle-with-code": lambda p: p.write_bytes(pickle.dumps(Evil())),
        "model-torch-pickle-with-code": lambda p: torch_save(p, {"model": Evil()}),
        "model-a-list": lambda p: torch_save(p, [1, 2]),
    }.items():
        def setup(ws, make=make):
            make(ws.runs / "t01" / "model.pt")

        def check(ws, result, redone=redone_and_same("t01/model.pt")):
            return no_pwned(ws, result) or redone(ws, result)
        out.append(finished("files", name, run01, setup=setup, rc=0, unchanged=None, check=check))
    out += [
        finished("files", "model-folder", run01, setup=replace_with_folder("t01/model.pt"), rc=2, unchanged=None,
                 says=["model.pt"]),
        # --force: t03 is redone from its parent's model file, which is not what t02's metrics.json records
        finished("files", "expanded-other-arch", run03 + ["--force"], unchanged=None,
                 setup=edit_model("t02/expanded.pt", arch="alexnet_cifar10"), says=["expanded.pt"]),
        finished("files", "expanded-other-classes", run03 + ["--force"], unchanged=None,
                 setup=edit_model("t02/expanded.pt", num_classes=7), says=["expanded.pt"]),
        finished("files", "expanded-spec-garbage", run03 + ["--force"], unchanged=None,
                 setup=edit_model("t02/expanded.pt", spec={"layers": "x", "ranks": [1]}), says=["expanded.pt"]),
    ]

    # the lock file
    def fifo_lock(ws):
        os.mkfifo(ws.runs / "t01" / ".lock")
    def symlink_lock(ws):
        os.symlink("metrics.json", ws.runs / "t01" / ".lock")
    def hardlink_lock(ws):
        os.link(ws.runs / "t01" / "metrics.json", ws.runs / "t01" / ".lock")
    def garbage_lock(ws):
        (ws.runs / "t01" / ".lock").write_bytes(os.urandom(300))
    force01 = run01 + ["--force"]
    out += [
        finished("files", "lock-fifo", force01, setup=fifo_lock, says=[".lock"], timeout=60),
        finished("files", "lock-symlink-to-metrics", force01, setup=symlink_lock, says=[".lock"]),
        finished("files", "lock-hardlink-to-metrics", force01, setup=hardlink_lock, says=[".lock"]),
        finished("files", "lock-garbage-is-taken", run01, setup=garbage_lock, rc=0, unchanged=None),
    ]

    # run folders and logs that are not what they should be
    def run_is_file(ws):
        (ws.runs / "t09").write_text("x")
        ws.config("t09.yaml", {"extends": "base.yaml"})
    def run_dangling(ws):
        os.symlink("/nonexistent/place", ws.runs / "t09")
        ws.config("t09.yaml", {"extends": "base.yaml"})
    def log_folder(ws):
        path = ws.runs / "t01" / "log.txt"
        path.unlink()
        path.mkdir()
    def resume_garbage(ws):
        m = metrics(ws.runs, "t03")
        del m["stages"]["finetune.1"]
        m["status"], m["running"] = "interrupted", {"finetune.1": {}}
        (ws.runs / "t03" / "metrics.json").write_text(json.dumps(m))
        (ws.runs / "t03" / "stage1.pt").unlink()
        (ws.runs / "t03" / "stage1.ckpt").write_bytes(os.urandom(3000))
    def victim_link(rel):
        def setup(ws):
            (ws.path / "victim.txt").write_text("a file outside the runs folder\n")
            path = ws.runs / rel
            path.unlink()
            os.symlink(ws.path / "victim.txt", path)
        return setup

    def fifo_log(ws):
        (ws.runs / "t01" / "log.txt").unlink()
        os.mkfifo(ws.runs / "t01" / "log.txt")
    out.append(finished("files", "log-fifo", force01, setup=fifo_log, says=["log.txt"], unchanged=None, timeout=60))

    def victim_kept(ws, result):
        text = (ws.path / "victim.txt").read_text()
        return None if text == "a file outside the runs folder\n" else f"a file outside the runs was written: {text[:200]!r}"
    for rel in ("t01/log.txt", "t01/metrics.json", "t01/config.yaml"):
        out.append(Case("files", f"symlink-out-{rel.split('/')[1]}", force01, setup=victim_link(rel), rc=0,
                        unchanged=None, needs_fixture=True, check=victim_kept))
        out[-1].rc = None  # refused (2) or done (0): either way the file outside stays as it was
    def config_fifo(ws):
        (ws.runs / "t01" / "config.yaml").unlink()
        os.mkfifo(ws.runs / "t01" / "config.yaml")
    bomb = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nmodel: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n")
    # a rerun may skip the finished run without reading config.yaml (0) or refuse it (2); an export reads it
    for rel_args, label, rc in ((run01 + ["--set", "train.epochs=3"], "rerun", None),
                                (["export", "runs/t01", "--format", "state-dict", "-o", "x.pt"], "export", 2)):
        out += [
            finished("files", f"config-yaml-fifo-{label}", rel_args, setup=config_fifo, says=["config.yaml"],
                     timeout=60, rc=rc, unchanged=None),
            finished("files", f"config-yaml-deep-{label}", rel_args, setup=write("t01/config.yaml", "[" * 100_000),
                     says=["config.yaml"], rc=rc, unchanged=None),
            finished("files", f"config-yaml-alias-bomb-{label}", rel_args, setup=write("t01/config.yaml", bomb),
                     says=["config.yaml"], timeout=60, rc=rc, unchanged=None),
        ]
    out += [
        finished("files", "run-folder-is-a-file", ["run", "cfg/t09.yaml", "--runs-dir", "runs"], setup=run_is_file,
                 says=["t09"]),
        finished("files", "run-folder-dangling-symlink", ["run", "cfg/t09.yaml", "--runs-dir", "runs"],
                 setup=run_dangling, says=["t09"]),
        finished("files", "log-is-a-folder", force01, setup=log_folder, says=["log.txt"], unchanged=None),
        # refused naming the checkpoint (2), or the stage started over (0) and equal to the uninterrupted run
        finished("files", "resume-checkpoint-garbage", run03, setup=resume_garbage, unchanged=None, rc=None,
                 says=["stage1.ckpt"], check=lambda ws, r: None if r.returncode == 2 or
                 model_digest(ws.runs / "t03" / "stage1.pt") == model_digest(ws.fixture / "runs" / "t03" / "stage1.pt")
                 else "differs from the uninterrupted run"),
    ]
    return out


def cache_cases() -> list[Case]:
    """runs/latency-tables.json, hostile: ignored with a warning naming it (measured again), or refused."""
    plan = ["decompose", "cfg/t04.yaml", "--runs-dir", "runs"]

    # At toy sizes the plan itself depends on the machine's noise: a run that finds no layer faster expanded
    # refuses its target (2). Either way the hostile cache must be named in a warning and replaced by a valid one.
    def valid_cache(ws, result):
        if "latency-tables.json" not in result.stderr or "warning" not in result.stderr:
            return f"no warning naming the cache: {tail(result.stderr)}"
        path = ws.runs / "latency-tables.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"the cache was not replaced by a valid one: {err}"
        if data.get("version") != 1 or not data.get("tables"):
            return f"the cache holds no tables: {str(data)[:200]}"
        return None

    hostile = {
        "cache-version-string": {"version": "1", "tables": {}},
        "cache-tables-list": {"version": 1, "tables": [1, 2]},
        "cache-a-list": [1, 2, 3],
        "cache-not-json": "{{{",
        "cache-not-utf8": b"\xff\xfe\x00",
        "cache-deep": "[" * 100_000 + "]" * 100_000,
    }
    out = [finished("cache", name, plan, setup=write("latency-tables.json", data), rc=None, unchanged=None,
                    check=valid_cache)
           for name, data in hostile.items()]

    # entries of the right key with hostile times: first a real run to learn the keys, then spoil them
    def spoiled(value):
        def setup(ws):
            first = ws.lrx(*plan, "--quiet")  # a toy plan may refuse its target (2): the times are cached first
            if first.returncode not in (0, 2) or not (ws.runs / "latency-tables.json").is_file():
                raise RuntimeError(f"the first latency run failed: {tail(first.stderr)}")
            cache = json.loads((ws.runs / "latency-tables.json").read_text())
            for key in cache["tables"]:
                cache["tables"][key] = value(cache["tables"][key])
            text = json.dumps(cache)
            (ws.runs / "latency-tables.json").write_text(text.replace('"__NAN__"', "NaN"))
            for name in ("t04",):
                subprocess.run(["rm", "-rf", str(ws.runs / name)], check=True)
        return setup
    for name, value in {
        "cache-negative-times": lambda e: {k: -1.0 for k in e},
        "cache-zero-times": lambda e: {k: 0 for k in e},
        "cache-nan-times": lambda e: {k: "__NAN__" for k in e},
        "cache-string-times": lambda e: {k: "fast" for k in e},
        "cache-entry-a-number": lambda e: 5,
        "cache-bool-times": lambda e: {k: True for k in e},
        "cache-huge-int-times": lambda e: {k: 10**400 for k in e},
    }.items():
        out.append(finished("cache", name, plan, setup=spoiled(value), rc=None, unchanged=None, check=valid_cache,
                            timeout=600))

    def folder(ws):
        (ws.runs / "latency-tables.json").mkdir()
    def fifo(ws):
        os.mkfifo(ws.runs / "latency-tables.json")
    out += [
        # refused at the decompose stage: the run folder exists by then, marked failed (a state, not damage)
        finished("cache", "cache-folder", plan, setup=folder, says=["latency-tables.json"], unchanged=None),
        finished("cache", "cache-fifo", plan, setup=fifo, rc=None, unchanged=None, check=valid_cache, timeout=120),
    ]
    return out


def export_cases() -> list[Case]:
    def export(name, *out_args, setup=None, rc=2, says=(), fmt="state-dict", run="runs/t03", check=None, timeout=300):
        return finished("export", name, ["export", run, "--format", fmt, *out_args], setup=setup, rc=rc, says=says,
                        unchanged="runs" if rc == 2 else None, check=check, timeout=timeout)

    def link_into_run(ws):
        os.symlink(ws.runs / "t03", ws.path / "into-run")
    def fifo(ws):
        os.mkfifo(ws.path / "out.fifo")
    def planted_module(ws):
        (ws.path / "planted.py").write_text("open('pwned', 'w').write('x')\n"
                                            "def build(num_classes=10):\n    raise SystemExit(0)\n")
        edit_model("t03/stage1.pt", arch="python:planted:build")(ws)

    def loads_back(fmt):
        def check(ws, result):
            if not (ws.path / "out.bin").is_file():
                return "no file written"
            left = temp_files(ws.path)
            return f"temporary files left: {left}" if left else None
        return check

    out = [
        export("inside-run-folder", "-o", "runs/t03/x.pt", says=["runs/t03"]),
        export("over-a-model-file", "-o", "runs/t01/model.pt", says=["model.pt"]),
        export("symlink-into-run", "-o", "into-run/x.pt", setup=link_into_run, says=["into-run"]),
        export("dev-full", "-o", "/dev/full", says=["/dev/full"]),
        export("a-folder", "-o", "runs", says=["runs"]),
        export("a-fifo", "-o", "out.fifo", setup=fifo, says=["out.fifo"], timeout=60),
        export("missing-folder", "-o", "nosuch/x.pt", says=["nosuch"]),
        export("name-too-long", "-o", "x" * 300 + ".pt", says=["xxxx"]),
        export("input-size-zero", "-o", "x.pt", "--input-size", "3,0,0", says=["--input-size"]),
        export("input-size-other-channels", "-o", "x.pt", "--input-size", "1,16,16", fmt="pt2", says=["--input-size"]),
        export("run-missing", "-o", "x.pt", run="runs/nosuch", says=["nosuch"]),
        export("folder-without-metrics", "-o", "x.pt", run="cfg", says=["cfg"]),
        export("config-without-run", "-o", "x.pt", run="cfg/t04.yaml", says=["t04"]),
        export("model-arch-a-number", "-o", "x.pt", setup=edit_model("t03/stage1.pt", arch=5), says=["stage1.pt"]),
        export("model-arch-os-abort", "-o", "x.pt", setup=edit_model("t03/stage1.pt", arch="python:os:abort"),
               says=["stage1.pt"]),
        export("model-arch-planted-module", "-o", "x.pt", setup=planted_module, says=["stage1.pt"],
               check=lambda ws, r: "the model file made lrx import and run planted.py" if (ws.path / "pwned").exists()
               else None),
        export("model-spec-garbage", "-o", "x.pt", setup=edit_model("t03/stage1.pt", spec={"x": 1}),
               says=["stage1.pt"]),
        export("model-random-bytes", "-o", "x.pt", setup=write("t03/stage1.pt", os.urandom(3000)),
               says=["stage1.pt"]),
    ]
    def plot_fifo(ws):
        os.mkfifo(ws.path / "p.png")
    out += [
        finished("export", "plot-unknown-suffix", ["plot", "runs", "-o", "p.xyz"], says=["p.xyz"]),
        finished("export", "plot-fifo", ["plot", "runs", "-o", "p.png"], setup=plot_fifo, says=["p.png"], timeout=60),
        finished("export", "plot-dev-full", ["plot", "runs", "-o", "/dev/full"], says=["/dev/full"]),
        finished("export", "plot-over-metrics", ["plot", "runs", "-o", "runs/t01/metrics.json"], says=["metrics.json"]),
        finished("export", "plot-into-run-folder", ["plot", "runs", "-o", "runs/t01/p.png"], says=["p.png"]),
        finished("export", "show-bases-unknown-suffix", ["decompose", "cfg/t02.yaml", "--runs-dir", "runs",
                                                         "--show-bases", "b.xyz"], says=["b.xyz"]),
        finished("export", "show-bases-good", ["decompose", "cfg/t02.yaml", "--runs-dir", "runs", "--show-bases",
                                               "b.png"], rc=0, unchanged=None, check=lambda ws, r: None if (ws.path / "b.png").is_file()
                 else "no picture written"),
        finished("export", "config-yaml-sizes-garbage", ["export", "runs/t03", "--format", "state-dict", "-o", "x.pt"],
                 setup=write("t03/config.yaml", "model: {name: tiny_cnn, num_classes: 10}\ndata: {image_size: big}\n"),
                 says=["config.yaml"]),
    ]
    for fmt in ("state-dict", "torchscript", "pt2", "onnx"):
        out.append(export(f"good-{fmt}", "-o", "out.bin", fmt=fmt, rc=0, check=loads_back(fmt), timeout=600))

    def file_limit(ws):
        (ws.path / "out.bin").write_bytes(b"previous")
        shell = (f"ulimit -f 4; exec {' '.join(LRX)} export runs/t03 "
                 "--format state-dict -o out.bin")
        result = subprocess.run(["bash", "-c", shell], cwd=ws.path, env=env(),
                                capture_output=True, text=True)
        problem = refusal_problem(result, ["out.bin"])
        if problem is None and (ws.path / "out.bin").read_bytes() != b"previous":
            problem = "the previous file was not kept"
        if problem is None and temp_files(ws.path):
            problem = f"temporary files left: {temp_files(ws.path)}"
        return problem, f"cd {ws.path} && bash -c '{shell}'"
    out.append(Case("export", "file-size-limit-keeps-previous", scenario=file_limit, needs_fixture=True))
    return out


def data_cases() -> list[Case]:
    """Image folders with symlink loops, links that leave the split, FIFOs and devices named like images."""
    def images(ws: Workspace) -> None:
        from PIL import Image  # local: only these cases need it
        for split in ("train", "val"):
            for label in ("cat", "dog"):
                folder = ws.path / "images" / split / label
                folder.mkdir(parents=True)
                for i in range(6):
                    Image.new("RGB", (8, 8), (40 * i, 100 if label == "cat" else 200, 0)).save(folder / f"{i}.png")
        ws.config("img.yaml", {"model": {"name": "tiny_cnn", "num_classes": 2}, "seed": 1, "select_on": "test",
                               "data": {"name": "imagefolder", "root": "images", "image_size": 16, "batch_size": 4,
                                        "test_batch_size": 4, "workers": 0},
                               "train": {"epochs": 0}, "profile": {"enabled": False}, "runtime": {"device": "cpu"}})

    def with_(make):
        def setup(ws):
            images(ws)
            make(ws.path / "images")
        return setup

    run = ["run", "cfg/img.yaml", "--runs-dir", "runs"]

    def case(name, make, rc=2, says=(), timeout=120):
        return Case("data", name, run, setup=with_(make), rc=rc, says=says, unchanged="runs" if rc == 2 else None,
                    timeout=timeout)

    def root_dev_zero(ws):
        images(ws)
        settings = yaml.safe_load((ws.cfg / "img.yaml").read_text())
        settings["data"]["root"] = "/dev/zero"
        ws.config("img.yaml", settings)

    def image_dir(root):
        (root / "train" / "cat" / "odd.png").mkdir()
    return [
        case("symlink-loop-to-parent", lambda r: os.symlink("..", r / "train" / "cat" / "up"), says=["up"]),
        case("symlink-loop-to-itself", lambda r: os.symlink(".", r / "train" / "cat" / "loop"), says=["loop"]),
        case("symlink-to-root", lambda r: os.symlink("/", r / "train" / "cat" / "root"), says=["root"]),
        case("class-link-leaves-split", lambda r: os.symlink(r / "val" / "dog", r / "train" / "bird"),
             says=["bird"]),
        case("class-link-to-other-class", lambda r: os.symlink("../dog", r / "train" / "cat" / "sub"), says=["sub"]),
        case("fifo-named-like-an-image", lambda r: os.mkfifo(r / "train" / "cat" / "f.png"), rc=0, timeout=60),
        case("dev-zero-named-like-an-image", lambda r: os.symlink("/dev/zero", r / "train" / "cat" / "z.png"),
             rc=0, timeout=60),
        case("dangling-link-image", lambda r: os.symlink("/nonexistent.png", r / "train" / "cat" / "d.png"), rc=0),
        case("folder-named-like-an-image", image_dir, rc=0),
        case("empty-class", lambda r: (r / "train" / "bird").mkdir(), says=["bird"]),
        case("val-class-missing-in-train", lambda r: (r / "val" / "cat").rename(r / "val" / "cow"), says=["cow"]),
        case("corrupt-image", lambda r: (r / "train" / "cat" / "0.png").write_bytes(b"not a png"), says=["0.png"]),
        Case("data", "root-is-dev-zero", run, setup=root_dev_zero, says=["/dev/zero"], unchanged="runs", timeout=60),
        case("root-missing", lambda r: subprocess.run(["rm", "-rf", str(r)], check=True), says=["images"]),
    ]


def cases() -> list[Case]:
    return metrics_cases() + model_file_cases() + cache_cases() + export_cases() + data_cases()
