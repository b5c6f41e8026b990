"""Measured speed of the expansion layers on CPU: each replaced layer alone, then whole models.

    .venv/bin/python benchmarks/layer_speed.py [--batch 64] [--repeats 5] [--threads 2] [--no-model]

alexnet_cifar10 (random weights, seed 0) at the seed's input, 3x224x224. Each of conv2-5 is timed alone
on the input it gets in the model at that batch: the original conv, scheme 1 (shared SVD bases at the
seed's 8, 8, 6, 4) grouped and decomposed, and scheme 2 at the ranks of ``plan_ranks(target={"speedup":
3.0})``, each with the tricks of :mod:`lrx.nn.inference` on and off. Then whole models: the original, and
scheme 2 at 2x/3x/4x plans, with and without ``lrx.nn.inference.optimise``.

Every figure is a ratio of medians from interleaved runs in this one process (each repeat times every
variant once, in an order that rotates), so that drift of a shared machine hits all variants alike.
Absolute milliseconds only hold on the machine that made them. Variants marked NHWC get their input
in channels_last, as they do inside a model whose layers run NHWC (the first such layer converts it
once); the others get the NCHW tensor the original model produces.

Cells read ``speedup (MAC ratio, realised)``: speedup = original conv's median / the variant's median,
MAC ratio = the original's MACs / the variant's (ptflops-equal formulas), realised = speedup / MAC ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.factor import decomposition as dec  # noqa: E402
from lrx.nn import inference as speed  # noqa: E402
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2  # noqa: E402
from lrx.expansion.model import expand  # noqa: E402
from lrx.nn.surgery import conv_sizes  # noqa: E402
from lrx.nn.models import build_model  # noqa: E402
from lrx.measure.timing import interleaved, layer_inputs  # noqa: E402
from lrx.plan.macs import plan_ranks  # noqa: E402
from lrx.measure.machine import cpu_name  # noqa: E402

LAYERS = [2, 3, 4, 5]
SEED_BASES = [8, 8, 6, 4]
CPU = torch.device("cpu")


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def mkldnn_off(fn):
    def call():
        with torch.backends.mkldnn.flags(enabled=False):
            return fn()
    return call


def optimised(layer, x, **options):
    """A deep copy of ``layer`` with an inference path chosen for input ``x``."""
    import copy

    return copy.deepcopy(layer).optimise_for("cpu", input_shape=tuple(x.shape), **options)


def folded_basis(layer: LowRankExpConvV1):
    """Scheme 1 shared basis as one batch-folded conv: (B*C, 1, H, W) with the M bases, then the 1x1 (not kept)."""
    c, m = layer.in_channels, layer.rank
    bases = layer.spatial.weight[:m].detach()  # channel 0's copy; all copies are equal after from_conv
    assert torch.equal(layer.spatial.weight.detach(), bases.repeat(c, 1, 1, 1)), "folding needs identical copies"

    def run(x):
        b, _, h, w = x.shape
        y = F.conv2d(x.reshape(b * c, 1, h, w), bases, None, layer.stride, layer.padding, layer.dilation)
        return layer.combine(y.reshape(b, c * m, *y.shape[-2:]))
    return run


def layer_variants(conv, x, v1, v1d, v2, v2_hv):
    """{label: (callable, MACs of one image)} for one replaced layer; the first entry is the reference."""
    xl = nhwc(x)
    stage = speed.conv_stage(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, 1, tuple(x.shape))
    out = {
        "original conv (NCHW, PyTorch default: oneDNN)": lambda: conv(x),
        "original conv, NHWC + prepacked": lambda: stage(xl),
        "original conv, mkldnn off (NNPACK)": mkldnn_off(lambda: conv(x)),
    }
    for name, layer in (("scheme 1", v1), ("scheme 1 decomposed", v1d)):
        out[f"{name}, default forward (NCHW)"] = (lambda layer=layer: layer(x))
        for path in ("factored", "dense"):
            fast = optimised(layer, x, path=path)
            out[f"{name}, {path} path (NHWC, prepacked)"] = (lambda fast=fast: fast(xl))
        if name == "scheme 1":
            fold = folded_basis(layer)
            out["scheme 1, batch-folded basis conv (NCHW)"] = lambda: fold(x)
    out["scheme 2, default forward (NCHW)"] = lambda: v2(x)
    out["scheme 2, mkldnn off (NCHW)"] = mkldnn_off(lambda: v2(x))
    plain = optimised(v2, x, path="factored", prepack=False)
    out["scheme 2, NHWC, not prepacked"] = lambda: plain(xl)
    fast = optimised(v2, x, path="factored")
    out["scheme 2, NHWC + prepacked"] = lambda: fast(xl)
    fast_hv = optimised(v2_hv, x, path="factored")
    out["scheme 2 order hv, NHWC + prepacked"] = lambda: fast_hv(xl)
    dense = optimised(v2, x, path="dense")
    out["scheme 2, dense path"] = lambda: dense(xl)
    return out


def auto_paths(v1, v1d, v2, x) -> dict[str, str]:
    return {"scheme 1": optimised(v1, x).inference_path, "scheme 1 decomposed": optimised(v1d, x).inference_path,
            "scheme 2": optimised(v2, x).inference_path}


def timed_units(model) -> list[tuple[str, torch.nn.Module]]:
    """The modules a per-module profile times: expansion layers whole, and every other leaf module."""
    expansion = dict(speed.expansion_layers(model))
    units = []
    for name, module in model.named_modules():
        inside = any(name.startswith(e + ".") for e in expansion)
        if name in expansion or (not inside and not list(module.children())):
            units.append((name, module))
    return units


def module_profile(models: dict, x: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall time (ms) of each unit of each model, the models run in turn in each repeat."""
    runs: dict[str, dict[str, list]] = {label: {} for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            times, hooks = runs[label], []
            for name, module in timed_units(model):
                def pre(module, args, name=name, times=times):
                    times.setdefault(name, []).append(-time.perf_counter())

                def post(module, args, output, name=name, times=times):
                    times[name][-1] += time.perf_counter()
                hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
            try:
                with torch.inference_mode():
                    model(x)
            finally:
                for h in hooks:
                    h.remove()
    return {label: {name: 1000 * statistics.median(v) for name, v in t.items()} for label, t in runs.items()}


def cell(speedup: float, mac_ratio: float) -> str:
    return f"{speedup:.2f}x ({mac_ratio:.2f}, {100 * speedup / mac_ratio:.0f}%)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per comparison (median taken); >= 5")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model timings")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-module profile of whole models")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started, load_before = time.perf_counter(), load()
    input_size = (3, args.image_size, args.image_size)

    model = build_model("alexnet_cifar10").eval()
    plans = {s: plan_ranks(model, LAYERS, "v2", {"speedup": s}, input_size) for s in (2.0, 3.0, 4.0)}
    ranks3 = plans[3.0]["ranks"]
    v1_model, v1_report = expand(model, LAYERS, "v1", SEED_BASES, input_size=input_size)
    v1d_model, v1d_report = expand(model, LAYERS, "v1", SEED_BASES, decomposed=True, input_size=input_size)
    v2_model, v2_report = expand(model, LAYERS, "v2", ranks3, input_size=input_size)
    names = v2_report.spec["layers"]
    sizes = conv_sizes(model, names, input_size)
    x_model = torch.randn(args.batch, *input_size, generator=torch.Generator().manual_seed(0))
    inputs = layer_inputs(model, names, x_model)
    modules = {label: dict(m.named_modules()) for label, m in
               (("orig", model), ("v1", v1_model.eval()), ("v1d", v1d_model.eval()), ("v2", v2_model.eval()))}

    print(f"# lrx layer speed: alexnet_cifar10 (random weights, seed 0), batch {args.batch}, input {input_size}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, {os.cpu_count()} CPUs, "
          f"load average at start {load_before}; interleaved, median of {args.repeats} rounds after "
          f"{args.warmup} warm-up")
    print(f"scheme 1: shared SVD bases {SEED_BASES}; scheme 2 ranks {ranks3} "
          f"(plan_ranks speedup 3.0: predicted {plans[3.0]['predicted_speedup']:.2f}x on conv2-5)\n")

    rows: dict[str, list] = {}
    totals: dict[str, list[float]] = {}
    reference_ms = []
    chosen = []
    for i, name in enumerate(names):
        conv, x = modules["orig"][name], inputs[name].clone().contiguous()
        v1, v1d, v2 = modules["v1"][name], modules["v1d"][name], modules["v2"][name]
        v2_hv = LowRankExpConvV2.from_conv(conv, ranks3[i], order="hv")
        in_hw, out_hw = sizes[name]
        macs = {
            "original": dec.original_macs(conv, out_hw),
            "scheme 1": dec.expanded_macs(conv, "v1", SEED_BASES[i], in_hw, out_hw),
            "scheme 1 decomposed": dec.expanded_macs(conv, "v1", SEED_BASES[i], in_hw, out_hw, decomposed=True),
            "scheme 2": dec.expanded_macs(conv, "v2", ranks3[i], in_hw, out_hw),
        }
        calls = layer_variants(conv, x, v1, v1d, v2, v2_hv)
        chosen.append(auto_paths(v1, v1d, v2, x))
        with torch.inference_mode():
            stats = interleaved(calls, CPU, args.warmup, args.repeats)
        reference = next(iter(stats))
        reference_ms.append(stats[reference]["median_ms"])
        for label, st in stats.items():
            family = next((f for f in ("scheme 1 decomposed", "scheme 1", "scheme 2") if label.startswith(f)),
                          "original")
            ratio = macs["original"] / macs[family]
            rows.setdefault(label, []).append((st["median_ms"], ratio))
            totals.setdefault(label, []).append(macs[family])
        print(f"timed {name} {tuple(x.shape)} ({time.perf_counter() - started:.0f} s, load {load()})",
              file=sys.stderr, flush=True)

    orig_total_macs = sum(totals[next(iter(rows))])
    header = ["variant"] + [f"conv{i} {tuple(inputs[n].shape[1:])}" for i, n in zip(LAYERS, names)] + ["conv2-5"]
    print("## Each replaced layer alone: speedup vs the original conv (MAC ratio, realised)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, cells in rows.items():
        per_layer = [cell(ref / ms, ratio) for (ms, ratio), ref in zip(cells, reference_ms)]
        total = cell(sum(reference_ms) / sum(ms for ms, _ in cells), orig_total_macs / sum(totals[label]))
        print(f"| {label} | " + " | ".join(per_layer) + f" | {total} |")
    print(f"| original conv, median ms | " + " | ".join(f"{ms:.0f}" for ms in reference_ms)
          + f" | {sum(reference_ms):.0f} |")
    print("\npath chosen by optimise_for('cpu') (path='auto'): " + "; ".join(
        f"conv{i}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for i, c in zip(LAYERS, chosen)))

    if not args.no_model:
        print("\n## Whole model: speedup vs the original model (MAC ratio of the model, realised)\n")
        import copy

        models = {"original (as is)": model, "original, channels_last (model.to)":
                  copy.deepcopy(model).to(memory_format=torch.channels_last)}
        mkldnn_off_label = "original, mkldnn off (NNPACK for the stride-1 convs)"
        models[mkldnn_off_label] = model
        mac_ratios = {label: 1.0 for label in models}
        paths = {}
        for target, plan in plans.items():
            expanded, _ = expand(model, LAYERS, "v2", plan["ranks"], input_size=input_size)
            ratio = plan["model_macs_before"] / plan["predicted_macs"]
            tag = f"scheme 2 @{target:.0f}x {plan['ranks']}"
            if target == 3.0:
                models[f"{tag}, default forward"] = expanded.eval()
                mac_ratios[f"{tag}, default forward"] = ratio
                layers_only = speed.optimise(copy.deepcopy(expanded).eval(), "cpu", x_model, channels_last=False)
                models[f"{tag}, layers optimised (NCHW model)"] = layers_only
                mac_ratios[f"{tag}, layers optimised (NCHW model)"] = ratio
            full = speed.optimise(copy.deepcopy(expanded).eval(), "cpu", x_model)
            models[f"{tag}, optimised (channels_last model)"] = full
            mac_ratios[f"{tag}, optimised (channels_last model)"] = ratio
            paths[f"@{target:.0f}x"] = list(speed.describe(full).values())
        with torch.inference_mode():
            calls = {label: (lambda m=m: m(x_model)) for label, m in models.items()}
            calls[mkldnn_off_label] = mkldnn_off(calls[mkldnn_off_label])
            stats = interleaved(calls, CPU, args.warmup, args.repeats)
        print("| model | median ms | IQR ms | speedup | MAC ratio | realised |")
        print("|---|---|---|---|---|---|")
        for label, st in stats.items():
            sp = st.get("speedup", 1.0)
            print(f"| {label} | {st['median_ms']:.0f} | {st['iqr_ms']:.0f} | {sp:.2f}x | {mac_ratios[label]:.2f} | "
                  f"{100 * sp / mac_ratios[label]:.0f}% |")
        if not args.no_profile:
            profiled = {"original": model, "original, channels_last": models["original, channels_last (model.to)"],
                        "scheme 2 @3x, optimised": models[f"scheme 2 @3x {plans[3.0]['ranks']}, optimised "
                                                          "(channels_last model)"]}
            table = module_profile(profiled, x_model, args.repeats)
            print("\n## Where the time goes: median ms per module (forward hooks, the three models in turn)\n")
            print("| module | " + " | ".join(profiled) + " |")
            print("|---|" + "---|" * len(profiled))
            before = {name: type(m).__name__ for name, m in timed_units(model)}
            after = {name: type(m).__name__ for name, m in timed_units(profiled["scheme 2 @3x, optimised"])}
            for name in table["original"]:
                kind = before[name] if before[name] == after[name] else f"{before[name]} -> {after[name]}"
                print(f"| {name} ({kind}) | " + " | ".join(f"{table[k][name]:.0f}" for k in profiled) + " |")
            print("| sum | " + " | ".join(f"{sum(table[k].values()):.0f}" for k in profiled) + " |")
        print("\npaths chosen by lrx.nn.inference.optimise (conv2-5): " + "; ".join(f"{k} {v}" for k, v in paths.items()))
        cl = stats["original, channels_last (model.to)"]["median_ms"]
        best = stats[f"scheme 2 @3x {plans[3.0]['ranks']}, optimised (channels_last model)"]["median_ms"]
        print(f"\nscheme 2 @3x optimised vs the original in channels_last (the layout change alone): "
              f"{cl / best:.2f}x")
    print(f"\n{args.threads} threads, batch {args.batch}; total {time.perf_counter() - started:.0f} s; "
          f"load average at end {load()}")


if __name__ == "__main__":
    main()
