"""A run's final model, ready to use, and written in forms that load without lrx.

    import lrx
    model = lrx.load_run("runs/exp11")                 # the run's final model, eval mode, on the CPU
    from lrx.output.export import to_plain, export_model
    plain = to_plain(model)                            # nn.Conv2d / nn.Sequential only, same outputs
    export_model(model, "exp11.onnx", "onnx", input_size=(3, 224, 224))

``to_plain`` replaces every expansion layer by an ``nn.Sequential`` of the plain convs it runs (its factors,
in order), so the plain model computes exactly the same function and needs nothing from lrx to build.
Every format is written from it:

- ``onnx``: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript), a dynamic batch
  axis, checked with ``onnx.checker``; runs in ONNX Runtime.
- ``pt2``: ``torch.export.save`` of ``torch.export.export`` (dynamic batch); ``torch.export.load(f).module()``.
- ``torchscript``: ``torch.jit.script`` (``torch.jit.trace`` where the architecture does not script);
  ``torch.jit.load(f)``.
- ``state-dict``: the plain model's state dict (tensors only, ``torch.load(f, weights_only=True)``), with
  the recipe (:func:`recipe`) that builds the plain modules around the original architecture.

Every file is written to a temporary file beside the target and renamed over it (:mod:`lrx.base.files`),
so a failed export (a full disk, a file-size limit) leaves the previous file as it was. The output is
checked before anything is loaded (:func:`check_output`): a directory, a device or FIFO, and a file in a
run directory (the run's own model files) are refused.

:func:`check_export` loads a written file the way a user without lrx would and compares its outputs with
PyTorch's; :func:`export_all` writes every format with reference outputs and :func:`check_without_lrx`
loads them in a subprocess that cannot import lrx (tests/test_export.py, benchmarks/export_check.py).
onnx, onnxscript and onnxruntime are the optional extra ``lrx[export]``, imported where used.

The module is long because every format is written, loaded back and compared here, beside the plain model and
the recipe that rebuilds it: they change together.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lrx.base.files import load_checkpoint, os_reason, write_atomic, write_named_atomic
from lrx.base.yamlread import show
from lrx.config.settings import (IMAGE_CHANNELS, MAX_CHANNELS, MAX_IMAGE_SIZE, Config, load_config,
                                 profile_input_size, size_text)
from lrx.base.errors import UserError
from lrx.nn.layers import factor_convs
from lrx.nn.models import PYTHON
from lrx.pipeline.rundir import RunDir, is_run_folder, load_model
from lrx.nn.channel import LowRankChannel
from lrx.nn.tucker import LowRankTucker2
from lrx.nn.inference import expansion_layers
from lrx.measure.timing import interleaved

__all__ = ["FORMATS", "EXTRA", "run_dir", "load_run", "final_model", "recorded_model", "plain_layer", "to_plain", "recipe",
           "original_code", "check_output", "WRITERS", "export_model", "check_export", "run_input_size", "export_run",
           "SUFFIX", "NO_LRX", "export_all", "check_without_lrx", "ort_session", "onnx_latency", "profile_onnx"]

FORMATS = ("onnx", "pt2", "torchscript", "state-dict")
EXTRA = "pip install 'lrx[export]' (onnx, onnxscript, onnxruntime)"


# ---------------------------------------------------------------- the final model of a run


def run_dir(run_or_config: str | Path, runs_dir: str | Path = "runs") -> RunDir:
    """The run a path means: a run folder (``runs/exp11``), or a config YAML whose run is in ``runs_dir``."""
    path = Path(run_or_config)
    if path.is_dir():
        return RunDir(path.parent, path.name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return RunDir(runs_dir, load_config(path).name)
    raise UserError(f"{path} is neither a run folder (e.g. runs/exp11) nor a config YAML")


def load_run(run: str | Path, runs_dir: str | Path = "runs") -> nn.Module:
    """The run's final model (:meth:`lrx.pipeline.rundir.RunDir.final_model_path`), in eval mode on the CPU.

    ``run``: a run folder (``"runs/exp11"``) or the config YAML of a run in ``runs_dir``. The model is
    an ordinary ``nn.Module`` holding lrx's expansion layers; :func:`lrx.nn.inference.optimise` picks their
    fastest CPU paths, :func:`to_plain` turns them into plain convs.
    """
    return final_model(run_dir(run, runs_dir))[0]


def final_model(run: RunDir) -> tuple[nn.Module, Path, dict]:
    """(the run's final model in eval mode, its file, its arch and num_classes: :func:`recorded_model`)."""
    path = run.final_model_path()
    arch, num_classes = recorded_model(run, path)
    model, _, _ = load_model(path, arch, num_classes)
    return model.eval(), path, {"arch": arch, "num_classes": num_classes}


def recorded_model(run: RunDir, path: Path) -> tuple[str, int]:
    """(architecture, classes) the model file ``path`` of ``run`` must hold: ``model.name`` and
    ``model.num_classes`` of the run's config.yaml, else (a folder without them) the file's own when they
    name no code (a registry or ``torchvision:`` name). A file's ``python:<module>:<factory>`` is never
    built unless config.yaml names it too: loading a model file must not import and call code no config
    named. :class:`UserError` naming the file otherwise."""
    model = run.read_config().get("model")
    name, classes = (model.get("name"), model.get("num_classes")) if isinstance(model, dict) else (None, None)
    if isinstance(name, str) and isinstance(classes, int) and not isinstance(classes, bool):
        return name, classes
    blob = load_checkpoint(path)
    name, classes = blob.get("arch"), blob.get("num_classes")
    if (not isinstance(name, str) or name.startswith(PYTHON) or isinstance(classes, bool)
            or not isinstance(classes, int)):
        raise UserError(f"its architecture {show(name)} with {show(classes)} classes is not one lrx builds from a "
                        f"model file alone, and {run.config_path()} does not name the run's model (model.name, "
                        "model.num_classes)", file=str(path))
    return name, classes


# ---------------------------------------------------------------- plain modules


def plain_layer(layer: nn.Module) -> nn.Sequential:
    """An expansion layer as an ``nn.Sequential`` of copies of its factor convs, in the order they run."""
    return nn.Sequential(*(copy.deepcopy(conv) for conv in factor_convs(layer)))


# Expansion layers made of plain modules already, and the parts their plain() keeps (under the same keys).
PLAIN_PARTS = {LowRankChannel: ("first", "second"), LowRankTucker2: ("first", "core", "last")}


def to_plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every expansion layer replaced by :func:`plain_layer`: plain ``nn.Conv2d`` in
    ``nn.Sequential``, the same outputs (the same convs run), nothing from lrx needed to build or load it.
    A channel layer becomes its :meth:`lrx.nn.channel.LowRankChannel.plain` (``first``, ``second``: two plain 1x1
    convs or linear layers, under the same state-dict keys), a Tucker-2 layer its
    :meth:`lrx.nn.tucker.LowRankTucker2.plain` (``first``, ``core``, ``last``)."""
    plain = copy.deepcopy(model)
    for name, layer in expansion_layers(plain):
        plain.set_submodule(name, plain_layer(layer))
    for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, tuple(PLAIN_PARTS))]:
        plain.set_submodule(name, layer.plain())
    return plain


def _conv_code(conv: nn.Conv2d) -> str:
    padding = repr(conv.padding) if isinstance(conv.padding, str) else tuple(conv.padding)
    mode = "" if conv.padding_mode == "zeros" else f", padding_mode={conv.padding_mode!r}"
    return (f"nn.Conv2d({conv.in_channels}, {conv.out_channels}, kernel_size={tuple(conv.kernel_size)}, "
            f"stride={tuple(conv.stride)}, padding={padding}, dilation={tuple(conv.dilation)}, "
            f"groups={conv.groups}, bias={conv.bias is not None}{mode})")


def _module_code(module: nn.Module) -> str:
    """The constructor call of a plain conv or linear layer (a channel layer's factor)."""
    if isinstance(module, nn.Linear):
        return f"nn.Linear({module.in_features}, {module.out_features}, bias={module.bias is not None})"
    return _conv_code(module)


def recipe(model: nn.Module, original: str = "...", state_file: str = "model.pt") -> str:
    """Python that builds :func:`to_plain`'s module around the original architecture and loads its state dict.

    ``original`` is the expression that builds the original model (e.g. ``torchvision.models.resnet18(num_classes=10)``).
    """
    lines = ["import torch", "from torch import nn", "", f"model = {original}  # the original architecture"]
    for name, layer in expansion_layers(model):
        described = f"  # was {type(layer).__name__}: {layer.extra_repr().split(', path=')[0]}"
        convs = ",\n    ".join(_conv_code(conv) for conv in factor_convs(layer))
        lines.append(f"model.set_submodule({name!r}, nn.Sequential(\n    {convs}))" + described)
    layered = [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(PLAIN_PARTS))]
    if layered:
        lines.insert(2, "from collections import OrderedDict")
    for name, layer in layered:
        described = f"  # was {type(layer).__name__}: {layer.extra_repr() or 'ranks ' + str(layer.ranks)}"
        parts = ",\n    ".join(f"({part!r}, {_module_code(getattr(layer, part))})" for part in PLAIN_PARTS[type(layer)])
        lines.append(f"model.set_submodule({name!r}, nn.Sequential(OrderedDict([\n    {parts}])))" + described)
    lines += [f"model.load_state_dict(torch.load({state_file!r}, weights_only=True))", "model.eval()"]
    return "\n".join(lines) + "\n"


def original_code(arch: str | None, num_classes: int | None) -> str:
    """The expression that builds the original architecture of a run's model, for :func:`recipe`: with
    ``num_classes`` outputs, as lrx built it (:func:`lrx.nn.models.build_model`): torchvision's
    ``get_model(name, num_classes=N)``, the user's ``factory(num_classes=N)`` (``factory()`` when the
    factory, imported already by lrx, takes no ``num_classes``), or lrx's registry."""
    arch = arch or "?"
    if arch.startswith("torchvision:"):
        return f"__import__('torchvision').models.get_model({arch.split(':', 1)[1]!r}, num_classes={num_classes})"
    if arch.startswith("python:"):
        module, _, factory = arch.split(":", 1)[1].strip().partition(":")
        takes = _takes_num_classes(getattr(sys.modules.get(module), factory, None))
        call = f"{factory}(num_classes={num_classes})" if takes else f"{factory}()"
        return f"__import__('importlib').import_module({module!r}).{call}"
    return (f"__import__('lrx.nn.models', fromlist=['build_model']).build_model({arch!r}, {num_classes})"
            "  # lrx's registry (or the same architecture in your code)")


def _takes_num_classes(factory: Any) -> bool:
    """Whether lrx calls ``factory(num_classes=N)`` (lrx.nn.models' rule); True when it cannot be told."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # not imported here, or a builtin without a signature
        return True
    return "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# ---------------------------------------------------------------- files


def _example(model: nn.Module, input_size) -> torch.Tensor:
    # Batch 2: torch.export specialises a dimension of size 1, and the batch axis must stay dynamic.
    first = next(model.parameters(), None)
    return torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0),
                       dtype=first.dtype if first is not None else torch.float32)


def _batch_dim():
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def check_output(path: str | Path) -> Path:
    """The file an export may write at ``path``, with symlinks resolved; a :class:`UserError` naming ``path``
    when it is a directory, exists as something other than a regular file (``/dev/full``, a FIFO), lies in a
    folder that does not exist, or lies in a run directory (a folder holding a run's metrics.json: writing
    there could replace the run's own model files), or when the OS refuses to look at it (a name too long)."""
    shown = str(path)
    try:
        real = Path(os.path.realpath(path))
        mode = os.stat(real).st_mode if os.path.lexists(real) else None
        folder_ok = real.parent.is_dir()
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
        raise UserError(f"cannot write it ({os_reason(err) if isinstance(err, OSError) else err})", file=shown) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UserError("is a directory; give the file to write, e.g. -o model.onnx", file=shown)
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError("is not a regular file (a device, FIFO or socket); an export writes a file", file=shown)
    if not folder_ok:
        raise UserError(f"{real.parent} is not a folder", file=shown)
    if is_run_folder(real.parent):
        raise UserError(f"is inside the run directory {real.parent}, whose files belong to the run (its model files "
                        "among them); write the export elsewhere", file=shown)
    return real


def _write_onnx(plain: nn.Module, x: torch.Tensor, path: Path) -> None:
    """ONNX by name (onnx's ``save`` takes one), checked with ``onnx.checker`` before it replaces anything."""
    try:
        import onnx  # local: optional extra lrx[export], heavy to import
        import onnxscript  # noqa: F401  # local: the dynamo exporter needs it; imported here for a clear message
    except ImportError as err:
        raise UserError(f"--format onnx needs {err.name}: {EXTRA}") from None
    program = torch.onnx.export(plain, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes=_batch_dim(), verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _write_torchscript(plain: nn.Module, x: torch.Tensor, f) -> str:
    try:
        scripted, how = torch.jit.script(plain), "scripted"
    except Exception as err:  # the user's architecture may not script (Python control flow): trace it
        scripted, how = torch.jit.trace(plain, x), f"traced, as it does not script: {type(err).__name__}"
    torch.jit.save(scripted, f)
    return how


# Per format: the writer of the plain model (``writer(plain, example input, destination)``): onnx's
# destination is a file name, the others' a binary file object; each is the temporary file of an atomic
# write (:func:`lrx.base.files.write_named_atomic`, :func:`lrx.base.files.write_atomic`).
WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Any], Any]] = {
    "onnx": _write_onnx, "torchscript": _write_torchscript,
    "pt2": lambda plain, x, f: torch.export.save(torch.export.export(plain, (x,), dynamic_shapes=_batch_dim()), f),
    "state-dict": lambda plain, x, f: torch.save(plain.state_dict(), f)}


def export_model(model: nn.Module, path: str | Path, fmt: str, input_size=(3, 224, 224),
                 original: str = "...") -> str:
    """Write ``model`` (expanded or not) as ``fmt`` (:data:`FORMATS`) to ``path``, from :func:`to_plain`'s
    module on the CPU in eval mode; returns a one-line summary (for ``state-dict``, followed by the recipe).

    ``input_size``: (C, H, W) of one image; the batch axis stays dynamic in onnx and pt2. The file is
    written atomically: on failure (a :class:`UserError` naming ``path`` and the OS's reason) a previous
    file at ``path`` is left as it was. ``path`` must pass :func:`check_output`.
    """
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r}; allowed: {', '.join(FORMATS)}")
    target = check_output(path)
    path = Path(path)
    plain = to_plain(model).cpu().float().eval()
    plain = plain.to(memory_format=torch.contiguous_format)
    x = _example(plain, input_size)
    done: list = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        if fmt == "onnx":
            write_named_atomic(target, lambda tmp: WRITERS[fmt](plain, x, tmp))
        else:
            write_atomic(target, lambda f: done.append(WRITERS[fmt](plain, x, f)))
    if fmt == "onnx":
        return f"wrote {path} (ONNX, checked with onnx.checker; input 'images' (batch, {', '.join(map(str, input_size))}))"
    if fmt == "pt2":
        return f"wrote {path} (torch.export; load with torch.export.load(f).module())"
    if fmt == "torchscript":
        return f"wrote {path} (TorchScript, {done[0]}; load with torch.jit.load(f))"
    return (f"wrote {path} (state dict of plain nn.Conv2d/nn.Sequential modules); build and load it with:\n\n"
            + recipe(model, original, path.name))


def check_export(model: nn.Module, path: str | Path, fmt: str, input_size=(3, 224, 224), batch: int = 3) -> float:
    """Load the file :func:`export_model` wrote as a user without lrx would (ONNX Runtime for onnx) and return
    the largest absolute difference of its outputs from ``model``'s on a random batch (float32)."""
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.cpu().float().eval()(x)
        if fmt == "onnx":
            try:
                import onnxruntime  # local: optional extra lrx[export], heavy to import
            except ImportError:
                raise UserError(f"checking an ONNX file needs onnxruntime: {EXTRA}") from None
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        elif fmt == "pt2":
            got = torch.export.load(str(path)).module()(x)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                got = torch.jit.load(str(path))(x)
        else:
            plain = to_plain(model).cpu().float().eval()
            plain.load_state_dict(torch.load(path, weights_only=True))
            got = plain(x)
    return (got - want).abs().max().item()


def run_input_size(run: RunDir) -> tuple[int, int, int]:
    """(C, H, W) a run's model was trained and evaluated at: profile.input_size's channels (or 3), data.image_size
    (or 224), from its config.yaml; :class:`UserError` naming config.yaml when they are not sizes."""
    config = run.read_config()
    profile, data = config.get("profile"), config.get("data")
    given = profile.get("input_size") if isinstance(profile, dict) else None
    channels = given[0] if isinstance(given, list) and given else IMAGE_CHANNELS
    size = data.get("image_size") if isinstance(data, dict) else None
    size = 224 if size is None else size
    for value, top in ((channels, MAX_CHANNELS), (size, MAX_IMAGE_SIZE)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise UserError(f"profile.input_size or data.image_size is {show(value)}, not a size; give the size "
                            "with --input-size C,H,W", file=str(run.config_path()))
    return channels, size, size


def export_run(run_or_config: str | Path, path: str | Path, fmt: str, runs_dir: str | Path = "runs",
               input_size=None, check: bool = True) -> str:
    """``lrx export``: write the final model of a run (a run folder or its config YAML) as ``fmt`` to ``path``.

    ``input_size``: (C, H, W), default the run's own (:func:`run_input_size`). With ``check`` the written
    file is loaded back (:func:`check_export`) and the largest difference from PyTorch is reported.
    Returns what to print.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}; allowed: {', '.join(FORMATS)}")
    check_output(path)  # before anything is loaded: a directory, a device or a run's own file is refused
    run = run_dir(run_or_config, runs_dir)
    model, model_path, arch = final_model(run)
    size = tuple(input_size) if input_size else run_input_size(run)
    try:  # a size the model does not take is the user's to change: one line, before anything is written
        with torch.no_grad():
            model(torch.zeros(1, *size))
    except RuntimeError as err:
        raise UserError(f"--input-size {','.join(map(str, size))}: the run's model does not run on images of that size "
                        f"({str(err).splitlines()[0][:160]}); give the C,H,W it takes") from None
    text = export_model(model, path, fmt, size, original_code(arch["arch"], arch["num_classes"]))
    status = run.read_metrics().get("status")
    unfinished = f" (the run is {status}: this is its last finished stage's model)" if status != "done" else ""
    lines = [f"final model of run {run.name}: {model_path}{unfinished}", text]
    if check:
        where = {"onnx": "ONNX Runtime", "pt2": "torch.export.load", "torchscript": "torch.jit.load",
                 "state-dict": "the plain model"}[fmt]
        lines.append(f"checked: largest |difference| from PyTorch {check_export(model, path, fmt, size):.2e} "
                     f"({where}, a random batch of 3 at {'x'.join(map(str, size))})")
    return "\n".join(lines)


# ---------------------------------------------------------------- checked where lrx cannot be imported

SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".ts", "state-dict": ".pt"}

# What a user without lrx runs (`python -I -c NO_LRX REPO FOLDER`): lrx's import is blocked and the
# repository is not on sys.path. It loads every model.* file in FOLDER, runs io.pt's inputs and prints one
# JSON line: per format the largest |difference| from io.pt's PyTorch outputs. The state dict goes into
# recipe.py's plain modules where the folder has one (an lrx-free expression of the original architecture),
# else into the architecture the .pt2 file holds, its weights zeroed first (so all of them come from the file).
NO_LRX = r"""
import json, sys
sys.path = [p for p in sys.path if p not in ("", ".", sys.argv[1])]  # the repository (an editable install adds it)
sys.modules["lrx"] = None  # `import lrx` now raises ImportError, whatever the site-packages hold
try:
    import lrx
    raise SystemExit("lrx could be imported")
except ImportError:
    pass
import os, warnings
warnings.simplefilter("ignore")
import onnxruntime, torch
from torch import nn
folder = sys.argv[2]
x, want = torch.load(os.path.join(folder, "io.pt"), weights_only=True)
session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
with torch.no_grad():
    got = {"onnx": torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]),
           "pt2": torch.export.load(os.path.join(folder, "model.pt2")).module()(x),
           "torchscript": torch.jit.load(os.path.join(folder, "model.ts"))(x)}
    if os.path.exists(os.path.join(folder, "recipe.py")):
        scope = {}
        exec(open(os.path.join(folder, "recipe.py")).read(), scope)
        model, into = scope["model"], "recipe.py"
    else:
        model, into = torch.export.load(os.path.join(folder, "model.pt2")).module(), "the .pt2 architecture"
        for tensor in model.state_dict().values():
            tensor.zero_()
        model.load_state_dict(torch.load(os.path.join(folder, "model.pt"), weights_only=True), strict=True)
    got["state-dict"] = model(x)
print(json.dumps({"diff": {k: (v - want).abs().max().item() for k, v in got.items()},
                  "scale": want.abs().max().item(), "state_dict_into": into,
                  "modules": sorted({type(m).__module__ for m in model.modules()}),
                  "lrx_loaded": [m for m, v in sys.modules.items() if v is not None and (m == "lrx" or m.startswith("lrx."))]}))
"""


def export_all(model: nn.Module, folder: str | Path, input_size=(3, 224, 224), original: str | None = None,
               batch: int = 5) -> torch.Tensor:
    """Write ``model`` in every format (:data:`FORMATS`) as ``folder/model<SUFFIX>``, with ``io.pt``: a random
    batch (``batch`` x ``input_size``, seed 2; not the exported batch of 2, the batch axis is dynamic) and
    ``model``'s outputs on it, the reference :func:`check_without_lrx` compares with. ``original``: an
    lrx-free expression that builds the original architecture (:func:`recipe`); given, ``recipe.py`` is
    written too. Returns the outputs (batch, classes)."""
    folder = Path(folder)
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
    torch.save((x, want), folder / "io.pt")
    for fmt in FORMATS:
        export_model(model, folder / f"model{SUFFIX[fmt]}", fmt, input_size)
    if original is not None:
        (folder / "recipe.py").write_text(recipe(model, original, str(folder / "model.pt")))
    return want


def check_without_lrx(folder: str | Path, timeout: float = 600) -> dict:
    """Load what :func:`export_all` wrote in a ``python -I`` subprocess that cannot import lrx (:data:`NO_LRX`).

    Returns ``{"diff": {format: largest |difference| from PyTorch}, "scale": largest |output|,
    "state_dict_into": what the state dict was loaded into, "modules": the modules of that model,
    "lrx_loaded": lrx modules found in the subprocess (none)}``; raises RuntimeError (the subprocess's
    stderr's end) when it fails.
    """
    repo = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-I", "-c", NO_LRX, repo, str(folder)],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"the check without lrx failed (exit {result.returncode}): {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- ONNX Runtime timing


def ort_session(path: str | Path, threads: int = 2):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads, sequential, every graph optimisation on."""
    try:
        import onnxruntime  # local: optional extra lrx[export], heavy to import
    except ImportError:
        raise UserError(f"timing in ONNX Runtime needs onnxruntime: {EXTRA}") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_latency(models: dict[str, nn.Module], folder: str | Path, batch: int = 16, input_size=(3, 224, 224),
                 threads: int = 2, warmup: int = 2, repeats: int = 10) -> dict:
    """Each model exported to ONNX in ``folder`` and timed in ONNX Runtime on the CPU, interleaved in one process.

    Returns ``{name: stats}`` as :func:`lrx.measure.timing.latency` gives them (median_ms, quartiles, noisy, and
    ``speedup`` = the first model's median / this one's).
    """
    sessions = {}
    for name, model in models.items():
        path = Path(folder) / f"{name}.onnx"
        export_model(model, path, "onnx", input_size)
        sessions[name] = ort_session(path, threads)
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0)).numpy()
    calls = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
    return interleaved(calls, torch.device("cpu"), warmup, repeats)


def profile_onnx(cfg: Config, runs_dir: str | Path = "runs") -> str:
    """``lrx profile --onnx``: the original (the baseline run's final model) and this run's final model, exported
    and timed in ONNX Runtime on the CPU at ``profile``'s batch, input size, threads, warm-up and repeats.
    Printed, not recorded in metrics.json."""
    p, size = cfg.profile, profile_input_size(cfg)
    models = {"original": final_model(RunDir(runs_dir, cfg.baseline or cfg.name))[0]}
    if cfg.baseline is not None:
        models[cfg.name] = final_model(RunDir(runs_dir, cfg.name))[0]
    threads = p.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        stats = onnx_latency(models, folder, p.batch, size, threads, p.warmup, p.repeats)
    parts = [f"{name} {s['median_ms']:.1f} ms{' (noisy)' if s['noisy'] else ''}" for name, s in stats.items()]
    if cfg.baseline is not None:
        parts.append(f"speedup {stats[cfg.name]['speedup']:.2f}x")
    return (f"ONNX Runtime (CPU, {threads} threads, batch {p.batch} at {size_text(size)}, "
            f"medians of {p.repeats} interleaved runs): " + ", ".join(parts))
