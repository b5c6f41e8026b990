"""Malformed configs, YAML oddities, extends loops, bad --set values and bad command-line options: each is
refused before anything runs, in one line naming the file and the key, exit code 2, nothing written."""
from __future__ import annotations

import os
import pickle
import zipfile

from harness import Case, Workspace


def base(**extra) -> dict:
    return {"extends": "base.yaml", **extra}


def bad(name: str, data, says=(), args=(), command="run", rc=2, category="config") -> Case:
    """``lrx <command> cfg/<name>.yaml --runs-dir runs`` of a config ``data`` (a mapping or the file's text)."""
    def setup(ws: Workspace, data=data):
        ws.config(f"{name}.yaml", data)
    return Case(category, name, [command, f"cfg/{name}.yaml", "--runs-dir", "runs", *args], setup=setup, rc=rc,
                says=[f"cfg/{name}.yaml", *says])


def deep(levels: int) -> str:
    return "a:\n" + "".join("  " * i + "b:\n" for i in range(1, levels)) + "  " * levels + "c: 1\n"


def extends_chain(ws: Workspace, length: int) -> None:
    for i in range(length):
        ws.config(f"chain{i}.yaml", {"extends": f"chain{i + 1}.yaml" if i + 1 < length else "base.yaml"})


class Evil:
    """A pickle that runs code when loaded: it would create the file ``pwned`` in the current folder."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def torch_save(path, obj) -> None:
    import torch  # local: only the checkpoint cases need it
    torch.save(obj, path)


def checkpoint_case(name: str, make, says=("model.checkpoint",)) -> Case:
    def setup(ws: Workspace):
        make(ws.path / "weights.pt")
        ws.config(f"{name}.yaml", base(model={"name": "tiny_cnn", "num_classes": 10, "checkpoint": "weights.pt"},
                                       train={"epochs": 0}))

    def no_code(ws, result):
        return "the pickle's code ran (pwned exists)" if (ws.path / "pwned").exists() else None
    return Case("config", name, ["run", f"cfg/{name}.yaml", "--runs-dir", "runs"], setup=setup, says=says,
                check=no_code)


def config_cases() -> list[Case]:
    out = [
        # unknown keys, wrong types, out-of-range values
        bad("unknown-top-key", base(modle={"name": "tiny_cnn"}), ["modle", "allowed"]),
        bad("unknown-nested-key", base(train={"epoch": 2}), ["train.epoch"]),
        bad("epochs-string", base(train={"epochs": "two"}), ["train.epochs"]),
        bad("epochs-float", base(train={"epochs": 2.5}), ["train.epochs"]),
        bad("batch-bool", base(data={"batch_size": True}), ["data.batch_size"]),
        bad("lr-negative", base(train={"lr": -1.0}), ["train.lr"]),
        bad("lr-nan", "extends: base.yaml\ntrain: {lr: .nan}\n", ["train.lr"]),
        bad("lr-inf", "extends: base.yaml\ntrain: {lr: .inf}\n", ["train.lr"]),
        bad("epochs-huge", "extends: base.yaml\ntrain: {epochs: 1000000000000000000000000000000}\n", ["train.epochs"]),
        bad("image-size-zero", base(data={"image_size": 0}), ["data.image_size"]),
        bad("image-size-huge", base(data={"image_size": 99999}), ["data.image_size"]),
        bad("batch-negative", base(data={"batch_size": -5}), ["data.batch_size"]),
        bad("one-class", base(model={"num_classes": 1}), ["model.num_classes"]),
        bad("seed-negative", base(seed=-1), ["seed"]),
        bad("seed-too-big", base(seed=2**32), ["seed"]),
        bad("seed-repeated", base(seed=[1, 1]), ["seed"]),
        bad("seed-empty-list", base(seed=[]), ["seed"]),
        bad("seed-float", base(seed=1.5), ["seed"]),
        bad("optimizer-unknown", base(train={"optimizer": "adam"}), ["train.optimizer", "sgd"]),
        bad("scheme-unknown", base(baseline="t01", decompose={"scheme": "v3"}), ["decompose.scheme", "v2"]),
        bad("bases-wrong-length", base(baseline="t01", decompose={"layers": [2, 3], "bases": [4]}), ["decompose.bases"]),
        bad("bases-word", base(baseline="t01", decompose={"bases": "many"}), ["decompose.bases"]),
        bad("target-without-auto", base(baseline="t01", decompose={"target": {"speedup": 2}}), ["decompose.target"]),
        bad("target-speedup-below-1", base(baseline="t01", decompose={"bases": "auto", "target": {"speedup": 0.5}}),
            ["decompose.target.speedup"]),
        bad("target-latency-nan", "extends: base.yaml\nbaseline: t01\ndecompose: {scheme: v2, bases: auto, "
            "target: {latency: .nan}}\n", ["decompose.target"]),
        bad("target-two-kinds", base(baseline="t01", decompose={"bases": "auto", "target": {"speedup": 2, "macs": 0.5}}),
            ["decompose.target"]),
        bad("layers-empty", base(baseline="t01", decompose={"layers": [], "bases": []}), ["decompose.layers"]),
        bad("layers-twice", base(baseline="t01", decompose={"layers": [2, 2], "bases": [4, 4]}), ["decompose.layers"]),
        bad("layer-zero", base(baseline="t01", decompose={"layers": [0], "bases": [4]}), ["decompose.layers.0"]),
        bad("name-leaves-runs", base(name="../evil"), ["name"]),
        bad("name-hidden", base(name=".hidden"), ["name"]),
        bad("name-slash", base(name="a/b"), ["name"]),
        bad("baseline-itself", base(name="me", baseline="me"), ["baseline"]),
        bad("parent-without-baseline", base(parent="t02"), ["baseline"]),
        bad("finetune-mapping", base(baseline="t01", parent="t02", finetune={"l2": 1}), ["finetune"]),
        bad("finetune-no-loss", base(baseline="t01", parent="t02", finetune=[{"epochs": 1}]), ["finetune.0"]),
        bad("betas-one", base(baseline="t01", parent="t02", finetune=[{"ce": 1, "betas": [0.9]}]),
            ["finetune.0.betas"]),
        bad("input-size-two", base(profile={"input_size": [3, 16]}), ["profile.input_size"]),
        bad("repeats-one", base(profile={"repeats": 1}), ["profile.repeats"]),
        bad("min-time-negative", base(profile={"min_time_s": -1}), ["profile.min_time_s"]),
        bad("data-unknown", base(data={"name": "imagenet"}), ["data.name", "synthetic"]),
        bad("model-python-bad-form", base(model={"name": "python:os.system"}), ["model.name"]),
        bad("model-torchvision-path", base(model={"name": "torchvision:../x"}), ["model.name"]),
        bad("val-both", base(data={"val_subset": 10, "val_fraction": 0.1}), ["data.val_fraction"]),
        bad("val-fraction-above-1", base(data={"val_fraction": 1.5}), ["data.val_fraction"]),
        bad("device-tpu", base(runtime={"device": "tpu"}), ["runtime.device"]),
        bad("checkpoint-blank", base(model={"checkpoint": "   "}, train={"epochs": 0}), ["model.checkpoint"]),
        bad("method-option-unknown", base(baseline="t01", decompose={"options": {"bogus": 1}}), ["decompose.options"]),
        bad("row-negative", base(no=-1), ["no"]),
        bad("remark-mapping", base(remark={"a": 1}), ["remark"]),
        bad("workers-negative", base(data={"workers": -1}), ["data.workers"]),
        # YAML oddities
        bad("empty-file", "", ["empty"]),
        bad("only-comment", "# nothing here\n", ["empty"]),
        bad("top-level-list", "- a\n- b\n", ["mapping"]),
        bad("top-level-scalar", "hello\n", ["mapping"]),
        bad("tab-indent", "train:\n\tepochs: 2\n", ["YAML"]),
        bad("unclosed-bracket", "extends: base.yaml\ndecompose: {layers: [2, 3\n", ["YAML"]),
        bad("duplicate-key", "extends: base.yaml\nseed: 1\nseed: 2\n", ["seed", "twice"]),
        bad("merge-key-duplicate", "extends: base.yaml\ntrain:\n  <<: {epochs: 1}\n  epochs: 2\n", ["epochs"]),
        bad("anchor-alias", "extends: base.yaml\ntrain: &t {epochs: 1}\nprofile: *t\n", ["anchors"]),
        bad("alias-bomb", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", ["anchors"]),
        bad("python-object-tag", "extends: base.yaml\nremark: !!python/object/apply:os.system ['touch pwned']\n"),
        bad("not-utf8", b"extends: base.yaml\nremark: \xff\xfe\n", ["utf-8"]),
        bad("nul-byte", b"extends: base.yaml\nremark: a\x00b\n"),
        bad("too-large", "extends: base.yaml\n" + "# " + "x" * 300_000 + "\n", ["KiB"]),
        bad("too-deep", deep(40), ["deeper"]),
        bad("integer-2000-digits", "extends: base.yaml\nseed: " + "9" * 2000 + "\n", ["seed"]),
        bad("key-is-a-list", "extends: base.yaml\n? [a, b]\n: 1\n"),
        bad("key-is-an-int", "extends: base.yaml\n1: 2\n", ["unknown key"]),
        bad("yaml11-yes", "extends: base.yaml\ntrain: {epochs: yes}\n", ["train.epochs"]),
        bad("row-is-off", "extends: base.yaml\nno: off\n", ["no"]),
        bad("ten-thousand-values", "extends: base.yaml\nremark: x\nz: [" + ", ".join(["1"] * 10_500) + "]\n",
            ["10000"]),
        # extends
        bad("extends-itself", "extends: extends-itself.yaml\n", ["extends"]),
        bad("extends-missing", "extends: nowhere.yaml\n", ["extends", "nowhere.yaml"]),
        bad("extends-list", "extends: [base.yaml]\n", ["extends"]),
        bad("extends-empty", "extends: ''\n", ["extends"]),
        bad("extends-directory", "extends: ..\n", ["extends"]),
        bad("extends-dev-zero", "extends: /dev/zero\n", ["extends"]),
        bad("extends-proc-mem", "extends: /proc/self/mem\n", ["extends"]),

    ]

    # a file extends: names is at fault: the line names that file
    out.append(Case("config", "extends-proc-environ", ["run", "cfg/environ.yaml", "--runs-dir", "runs"],
                    setup=lambda ws: ws.config("environ.yaml", "extends: /proc/self/environ\n"),
                    says=["/proc/self/environ"]))

    def loop(ws):
        ws.config("loop-a.yaml", "extends: loop-b.yaml\n")
        ws.config("loop-b.yaml", "extends: loop-a.yaml\n")
    out.append(Case("config", "extends-loop", ["run", "cfg/loop-a.yaml", "--runs-dir", "runs"], setup=loop,
                    says=["extends", "loop"]))

    def chain(ws):
        extends_chain(ws, 20)
    out.append(Case("config", "extends-chain-20", ["run", "cfg/chain0.yaml", "--runs-dir", "runs"], setup=chain,
                    says=["extends", "16"]))

    # the config path itself
    def fifo(ws):
        os.mkfifo(ws.cfg / "fifo.yaml")
    out += [
        Case("config", "config-is-a-folder", ["run", "cfg", "--runs-dir", "runs"], says=["cfg"]),
        Case("config", "config-missing", ["run", "cfg/nosuch.yaml", "--runs-dir", "runs"], says=["nosuch.yaml"]),
        Case("config", "config-dev-null", ["run", "/dev/null", "--runs-dir", "runs"], says=["/dev/null"]),
        Case("config", "config-dev-zero", ["run", "/dev/zero", "--runs-dir", "runs"], says=["/dev/zero"], timeout=30),
        Case("config", "config-dev-stdin", ["run", "/dev/stdin", "--runs-dir", "runs"], says=["/dev/stdin"],
             timeout=30),
        Case("config", "config-fifo", ["run", "cfg/fifo.yaml", "--runs-dir", "runs"], setup=fifo,
             says=["fifo.yaml"], timeout=30),
    ]

    # across configs (checked before any of them runs)
    def other_name(ws):
        ws.config("t01.yaml", base(name="other", no=1))
    def baseline_loop(ws):
        ws.config("la.yaml", base(baseline="lb", decompose={"layers": [2], "bases": [4]}))
        ws.config("lb.yaml", base(baseline="la", decompose={"layers": [2], "bases": [4]}))
    def other_images(ws):
        ws.config("child.yaml", base(baseline="t01", data={"image_size": 20},
                                     decompose={"layers": [2], "bases": [4]}))
    out += [
        Case("config", "baseline-names-another-run", ["run", "cfg/t02.yaml", "--runs-dir", "runs"], setup=other_name,
             says=["baseline"]),
        bad("baseline-missing-config", base(baseline="nosuch", decompose={"layers": [2], "bases": [4]}),
            ["nosuch"]),
        Case("config", "baseline-loop", ["run", "cfg/la.yaml", "--runs-dir", "runs"], setup=baseline_loop,
             says=["loop"]),
        Case("config", "child-other-images", ["run", "cfg/child.yaml", "--runs-dir", "runs"], setup=other_images,
             says=["image_size"]),
        # checked against the model, before anything runs
        bad("layer-beyond-model", base(baseline="t01", decompose={"layers": [99], "bases": [4]}),
            ["decompose.layers"]),
        bad("rank-beyond-layer", base(baseline="t01", decompose={"layers": [2], "bases": [999]}),
            ["decompose.bases"]),
        bad("device-cuda-missing", base(runtime={"device": "cuda"}), ["cuda"]),
        bad("model-unknown", base(model={"name": "resnet9000"}), ["model.name"]),
        bad("model-python-missing", base(model={"name": "python:nosuchmodule_x:build"}), ["model.name"]),
        bad("checkpoint-missing", base(model={"checkpoint": "nosuch.pt"}, train={"epochs": 0}),
            ["model.checkpoint", "nosuch.pt"]),
        bad("checkpoint-dev-zero", base(model={"checkpoint": "/dev/zero"}, train={"epochs": 0}),
            ["model.checkpoint", "/dev/zero"]),
        bad("checkpoint-folder", base(model={"checkpoint": "cfg"}, train={"epochs": 0}), ["model.checkpoint"]),
        checkpoint_case("checkpoint-random-bytes", lambda p: p.write_bytes(os.urandom(4096))),
        checkpoint_case("checkpoint-empty", lambda p: p.write_bytes(b"")),
        checkpoint_case("checkpoint-pickle-with-code", lambda p: p.write_bytes(pickle.dumps(Evil()))),
        checkpoint_case("checkpoint-torch-pickle-with-code", lambda p: torch_save(p, {"model": Evil()})),
        checkpoint_case("checkpoint-zip-without-data", lambda p: zipfile.ZipFile(p, "w").writestr("x/junk", "y")),
        checkpoint_case("checkpoint-a-list", lambda p: torch_save(p, [1, 2, 3])),
        checkpoint_case("checkpoint-non-tensors", lambda p: torch_save(p, {"conv.weight": 1})),
        checkpoint_case("checkpoint-int-keys", lambda p: torch_save(p, {1: __import__("torch").zeros(2)})),
        checkpoint_case("checkpoint-wrong-shapes", lambda p: torch_save(p, {"a.weight": __import__("torch").zeros(2)})),
    ]
    return out


def set_cases() -> list[Case]:
    """Bad --set values and command-line options."""
    def run(name, *args, says=(), config="t01", command="run", rc=2):
        return Case("set", name, [command, f"cfg/{config}.yaml", "--runs-dir", "runs", *args], says=says, rc=rc)

    long_key = ".".join(["a"] * 40) + "=1"
    return [
        run("set-not-a-number", "--set", "train.epochs=abc", says=["train.epochs"]),
        run("set-without-equals", "--set", "train.epochs", says=["--set"]),
        run("set-broken-list", "--set", "train.epochs=[1, 2", says=["train.epochs"]),
        run("set-index-beyond", "--set", "finetune.5.epochs=1", says=["finetune"], config="t03"),
        run("set-key-below-number", "--set", "train.epochs.x=1", says=["train.epochs"]),
        run("set-empty-key", "--set", "=3"),
        run("set-seed-negative", "--set", "seed=-1", says=["seed"]),
        run("set-auto-without-target", "--set", "decompose.bases=auto", says=["decompose"], config="t02"),
        run("set-anchor", "--set", "train={epochs: &a 1}", says=["anchors"]),
        run("set-python-tag", "--set", "remark=!!python/object/apply:os.system ['touch pwned']"),
        run("set-too-deep", "--set", long_key),
        run("set-nan-lr", "--set", "train.lr=.nan", says=["train.lr"]),
        run("set-index-not-number", "--set", "finetune.x.epochs=1", says=["finetune"], config="t03"),
        run("set-dict-over-list", "--set", "finetune={a: 1}", says=["finetune"], config="t03"),
        run("seeds-words", "--seeds", "a,b", says=["--seeds"]),
        run("seeds-repeated", "--seeds", "1,1", says=["--seeds"]),
        run("seeds-empty", "--seeds", "", says=["--seeds"]),
        run("seeds-too-big", "--seeds", "99999999999", says=["--seeds"]),
        run("profile-input-size-zero", "--input-size", "3,0,0", says=["--input-size"], command="profile"),
        run("profile-input-size-words", "--input-size", "abc", says=["--input-size"], command="profile"),
        run("profile-input-size-and-force", "--input-size", "3,16,16", "--force", says=["--force"],
            command="profile"),
        run("profile-threads-zero", "--threads", "0", says=["profile.threads"], command="profile"),
        run("profile-batch-negative", "--batch", "-1", says=["profile.batch"], command="profile"),
        run("profile-device-tpu", "--device", "tpu", says=["profile.device"], command="profile"),
        run("train-a-child", says=["baseline"], config="t02", command="train"),
        run("decompose-without-block", says=["decompose"], command="decompose"),
        Case("set", "table-format-xml", ["table", "runs", "--format", "xml"], says=["xml"],
             setup=lambda ws: ws.runs.mkdir()),
        Case("set", "table-missing-folder", ["table", "nosuch"], says=["nosuch"]),
        Case("set", "clean-missing-folder", ["clean", "nosuch"], says=["nosuch"]),
        Case("set", "plot-missing-folder", ["plot", "nosuch", "-o", "p.png"], says=["nosuch"]),
        Case("set", "runs-dir-is-a-file", ["run", "cfg/t01.yaml", "--runs-dir", "afile"],
             setup=lambda ws: (ws.path / "afile").write_text("x"), says=["afile"]),
        Case("set", "runs-dir-in-proc", ["run", "cfg/t01.yaml", "--runs-dir", "/proc/lrx-runs"],
             says=["/proc/lrx-runs"]),
        Case("set", "export-format-xml", ["export", "cfg/t01.yaml", "--format", "xml", "-o", "x.bin"],
             says=["xml"]),
    ]


def cases() -> list[Case]:
    return config_cases() + set_cases()
