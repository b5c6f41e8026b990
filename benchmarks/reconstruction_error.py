"""Filter reconstruction error of each expansion on a model's convs, as a markdown table.

    .venv/bin/python benchmarks/reconstruction_error.py                # alexnet_cifar10 conv2-5, bases 8,8,6,4
    .venv/bin/python benchmarks/reconstruction_error.py --init imagenet  # with torchvision's ImageNet features

Columns: relative error ||W - W_hat||_F / ||W||_F of scheme 1 (shared and per-channel bases; SVD and
the alternating nuclear-norm method; plain and with each basis filter split into dh x 1 and 1 x dw),
and of scheme 2 at the largest rank whose MACs do not exceed scheme 1's at the same M.
"""
from __future__ import annotations

import argparse
import time

import torch

from lrx.factor import decomposition as dec
from lrx.nn.surgery import conv_sizes, select_layers
from lrx.nn.models import build_model


def rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w = w.double()
    return ((w - w_hat.double()).norm() / w.norm()).item()


def split(factors: dec.Scheme1Factors) -> dec.Scheme1Factors:
    v, h = dec.separable_rank1(factors.bases)
    return dec.Scheme1Factors(v[..., :, None] * h[..., None, :], factors.coefficients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alexnet_cifar10")
    parser.add_argument("--init", default="scratch", choices=["scratch", "imagenet"])
    parser.add_argument("--layers", default="2,3,4,5", help="1-based conv indices")
    parser.add_argument("--bases", default="8,8,6,4", help="M per layer")
    parser.add_argument("--size", type=int, default=224, help="input H = W, for the MAC-matched scheme 2 rank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = build_model(args.model, init=args.init)
    chosen = select_layers(model, [int(i) for i in args.layers.split(",")])
    ranks = [int(m) for m in args.bases.split(",")]
    sizes = conv_sizes(model, [name for _, name, _ in chosen], (3, args.size, args.size))

    columns = ["shared", "per-channel", "shared split", "per-channel split",
               "alt shared", "alt per-channel", "alt shared split", "alt per-channel split", "v2 (K)"]
    print(f"{args.model}, init={args.init}, seed={args.seed}, torch {torch.__version__}, "
          f"alternating with defaults {dec.ALTERNATING_DEFAULTS}\n")
    print("| layer | shape | M | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 3))
    totals = {"svd": 0.0, "alternating": 0.0}
    for (index, name, conv), m in zip(chosen, ranks):
        w = conv.weight.detach()
        row = {}
        for method in ("svd", "alternating"):
            prefix = "alt " if method == "alternating" else ""
            for basis in ("shared", "per-channel"):
                start = time.perf_counter()
                factors = dec.scheme1(w, m, basis, method)
                totals[method] += time.perf_counter() - start
                row[prefix + basis] = rel_error(w, dec.scheme1_weight(factors))
                row[prefix + basis + " split"] = rel_error(w, dec.scheme1_weight(split(factors)))
        in_hw, out_hw = sizes[name]
        budget = dec.expanded_macs(conv, "v1", m, in_hw, out_hw)
        k = max(r for r in range(1, dec.max_rank(conv, "v2") + 1)
                if r == 1 or dec.expanded_macs(conv, "v2", r, in_hw, out_hw) <= budget)
        v2 = rel_error(w, dec.scheme2_weight(dec.scheme2_svd(w, k)))
        cells = [f"{row[c]:.4f}" for c in columns[:-1]] + [f"{v2:.4f} ({k})"]
        print(f"| {index} {name} | {tuple(w.shape)} | {m} | " + " | ".join(cells) + " |")
    print(f"\nwall time over these layers, both bases: SVD {totals['svd']:.2f} s, "
          f"alternating {totals['alternating']:.2f} s (torch threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
