"""Deployment speed: ONNX Runtime on the CPU against PyTorch, for the original AlexNet and rows 2, 11 and 12.

    .venv/bin/python benchmarks/onnx_speed.py [--batch 16] [--threads 2] [--repeats 15] [--out FILE.md]

alexnet_cifar10 with random weights (seed 0; timing does not depend on the values) at the seed's input,
3x224x224, batch 16, 2 threads. The expansions are the quick rows' structures: row 2 is scheme 1 on conv2-5 at
configs/quick/expanded.yaml's bases; rows 11 and 12 are scheme 2 at the ranks their runs chose (``bases: auto``
plans from the trained weights, so the ranks are read from runs/quick/<row>/metrics.json when the run exists,
else from the committed results/quick.md). Each model is exported with ``lrx export``'s code
(:func:`lrx.output.export.export_model`: the plain convs, the dynamo exporter) and timed in ONNX Runtime's CPU
execution provider (intra-op threads = --threads, sequential, all graph optimisations), interleaved in one
process; then the same models in PyTorch, eager (NCHW, as exported) and with ``lrx.nn.inference.optimise`` (lrx's
CPU paths; channels_last for the original), also interleaved. Cells are medians of --repeats runs;
speedups are the original's median / the model's median in the same runtime. Absolute milliseconds hold
only on the machine that made them.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lrx.config.settings import load_config  # noqa: E402
from lrx.output.export import onnx_latency  # noqa: E402
from lrx.expansion.model import expand  # noqa: E402
from lrx.nn.models import build_model  # noqa: E402
from lrx.measure.profiling import count  # noqa: E402
from lrx.nn.inference import optimise  # noqa: E402
from lrx.measure.timing import interleaved  # noqa: E402

ROWS = {2: "exp02", 11: "exp11", 12: "exp12"}


def row_ranks(no: int, name: str, cfg) -> tuple[list[int], str]:
    """The row's ranks and where they came from."""
    if cfg.decompose.bases != "auto":
        return list(cfg.decompose.bases), f"configs/quick/{name}.yaml"
    metrics = ROOT / "runs" / "quick" / name / "metrics.json"
    if metrics.exists():
        bases = (json.loads(metrics.read_text()).get("decompose") or {}).get("bases")
        if bases:
            return list(bases), str(metrics.relative_to(ROOT))
    for line in (ROOT / "results" / "quick.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) > 3 and cells[1].strip() == str(no):
            return [int(v) for v in re.findall(r"\d+", cells[3])], "results/quick.md"
    raise SystemExit(f"row {no}: no ranks found (run configs/quick/{name}.yaml or keep results/quick.md)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (3, 224, 224)

    torch.manual_seed(0)
    original = build_model("alexnet_cifar10").eval()
    models, about = {"original": original}, {"original": ("-", "-", "-")}
    for no, name in ROWS.items():
        cfg = load_config(ROOT / "configs" / "quick" / f"{name}.yaml")
        d = cfg.decompose
        ranks, source = row_ranks(no, name, cfg)
        expanded, _ = expand(original, d.layers, d.scheme, ranks, basis=d.basis, decomposed=d.decomposed,
                             input_size=size, order=d.order)
        models[f"row {no}"] = expanded.eval()
        about[f"row {no}"] = (f"scheme {d.scheme}", ",".join(map(str, ranks)), source)
    macs = {name: count(model, size)[0] for name, model in models.items()}

    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        ort = onnx_latency(models, folder, args.batch, size, args.threads, args.warmup, args.repeats)
    x = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(0))
    eager = {name: model for name, model in models.items()}
    fast = {name: optimise(copy.deepcopy(model).eval(), "cpu", x[:1]) for name, model in models.items()}
    calls = {}
    for name in models:
        calls[f"{name} eager"] = (lambda m=eager[name]: m(x))
        calls[f"{name} optimised"] = (lambda m=fast[name]: m(x))
    with torch.inference_mode():
        torch_stats = interleaved(calls, torch.device("cpu"), args.warmup, args.repeats)

    def ratio(stats: dict, name: str, ref: str) -> str:
        return f"{stats[ref]['median_ms'] / stats[name]['median_ms']:.2f}x"

    head = (f"ONNX Runtime and PyTorch on the CPU: alexnet_cifar10 at {size[1]}x{size[2]}, batch {args.batch}, "
            f"{args.threads} threads, medians of {args.repeats} interleaved runs ({platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {time.time() - started:.0f} s)\n")
    lines = [head, "|model|scheme|ranks (conv2-5)|MACs (M)|ORT (ms)|ORT speedup|PyTorch eager (ms)|speedup|"
                   "PyTorch + lrx.nn.inference.optimise (ms)|speedup|ranks from|",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in models:
        scheme, ranks, source = about[name]
        noisy = any(s["noisy"] for s in (ort[name], torch_stats[f"{name} eager"], torch_stats[f"{name} optimised"]))
        lines.append(f"|{name}{' ~' if noisy else ''}|{scheme}|{ranks}|{macs[name] / 1e6:.1f}|{ort[name]['median_ms']:.1f}|"
                     f"{ratio(ort, name, 'original')}|{torch_stats[f'{name} eager']['median_ms']:.1f}|"
                     f"{ratio(torch_stats, f'{name} eager', 'original eager')}|"
                     f"{torch_stats[f'{name} optimised']['median_ms']:.1f}|"
                     f"{ratio(torch_stats, f'{name} optimised', 'original optimised')}|{source}|")
    lines.append("\n~: a noisy median (its middle half spans more than 20% of it, lrx.measure.timing's rule).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
