"""Public API: replace a model's convs by low-rank expansions, and rebuild such a model from its spec.

    from lrx.lowrank import LowRankExpConvV1, LowRankExpConvV2, expand, build_expanded

    expanded, report = expand(model, layers=[2, 3, 4, 5], scheme="v1", ranks=[8, 8, 6, 4])
    torch.save({"model": expanded.state_dict(), "spec": report["spec"]}, "expanded.pt")
    ...
    again = build_expanded(build_model("alexnet_cifar10"), saved["spec"])
    again.load_state_dict(saved["model"])
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .decomposition import (BASES, METHODS, ORDERS, SCHEMES, check_choice, check_rank, energy_first_sv,
                            expanded_macs, max_rank, original_macs, scheme1)
from .config import check_method_options
from .errors import UserError
from .layers import LowRankExpConvV1, LowRankExpConvV2, check_convertible
from .models import conv_layers

__all__ = ["LowRankExpConvV1", "LowRankExpConvV2", "expand", "build_expanded", "select_layers", "conv_sizes"]

SPEC_KEYS = ("layers", "scheme", "ranks", "basis", "decomposed")


def select_layers(model: nn.Module, layers: Sequence[int | str]) -> list[tuple[int, str, nn.Conv2d]]:
    """Resolve 1-based positions among the model's ``nn.Conv2d`` modules (module order) or module names.

    Returns (1-based index, qualified name, conv) per requested layer, in the order given.
    """
    convs = conv_layers(model)
    by_name = {name: i for i, (name, _) in enumerate(convs)}
    if isinstance(layers, (int, str)):
        layers = [layers]
    if not layers:
        raise UserError("no layers to expand: give 1-based conv indices or module names")
    chosen = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise UserError(f"layer {layer!r} must be a 1-based conv index or a module name")
        if isinstance(layer, int):
            if not 1 <= layer <= len(convs):
                raise UserError(f"layer {layer} does not exist: the model has {len(convs)} conv layers "
                                f"(indices 1..{len(convs)})")
            i = layer - 1
        elif layer in by_name:
            i = by_name[layer]
        else:
            shown = ", ".join(list(by_name)[:10]) + (", ..." if len(by_name) > 10 else "")
            raise UserError(f"no conv layer named {layer!r}; conv layers: {shown}")
        chosen.append((i + 1, *convs[i]))
    names = [name for _, name, _ in chosen]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"layer(s) {', '.join(repeated)} given more than once")
    return chosen


def layer_label(index: int, name: str) -> str:
    """How messages name a chosen conv: its 1-based position (the seed's "layer 2") and its module name."""
    return f"{index} ({name!r})"


@torch.no_grad()
def conv_sizes(model: nn.Module, names: Sequence[str], input_size=(3, 224, 224)) -> dict[str, tuple[tuple, tuple]]:
    """Spatial (H, W) at the input and output of the named convs, for one image of ``input_size``.

    Runs one forward pass in eval mode with hooks on a deep copy, so ``model`` (batch-norm
    statistics, training flags) is left as it was.
    """
    probe = copy.deepcopy(model).eval()
    sizes, hooks = {}, []
    for name in names:
        def hook(module, inputs, output, name=name):
            sizes[name] = (tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:]))
        hooks.append(probe.get_submodule(name).register_forward_hook(hook))
    first = next(probe.parameters(), None)
    x = torch.zeros(1, *input_size, device=first.device if first is not None else None,
                    dtype=first.dtype if first is not None and first.is_floating_point() else None)
    try:
        probe(x)
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]  # torch's messages can run to dozens of lines
        raise UserError(f"the model does not run on an input of size {tuple(input_size)}: {first}") from None
    finally:
        for h in hooks:
            h.remove()
    missing = [name for name in names if name not in sizes]
    if missing:
        raise UserError(f"layer(s) {', '.join(missing)} are not used in the model's forward pass")
    return sizes


def _ranks(ranks, count: int) -> list:
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        return [ranks] * count
    if isinstance(ranks, (str, dict)):
        hint = "pass plan['ranks']" if isinstance(ranks, dict) else "plan ranks from a target with lrx.ranks.plan_ranks"
        raise UserError(f"ranks {ranks if isinstance(ranks, str) else 'of a dict'!r}: give one rank per layer ({hint})")
    ranks = list(ranks)
    if len(ranks) != count:
        raise UserError(f"{len(ranks)} ranks given for {count} layers: give one rank per layer")
    return ranks


def _new_layer(conv: nn.Conv2d, scheme: str, rank: int, basis: str, decomposed: bool, order: str = "vh") -> nn.Module:
    """An expansion layer with ``conv``'s geometry, default-initialised, on its device and dtype."""
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    if scheme == "v1":
        return LowRankExpConvV1(conv.in_channels, conv.out_channels, conv.kernel_size, rank,
                                decomposed=decomposed, basis=basis, **geometry)
    return LowRankExpConvV2(conv.in_channels, conv.out_channels, conv.kernel_size, rank, order=order, **geometry)


def expand(model: nn.Module, layers: Sequence[int | str] = (2, 3, 4, 5), scheme: str = "v1",
           ranks: Sequence[int] | int = (8, 8, 6, 4), basis: str = "shared", method: str = "svd",
           decomposed: bool = False, input_size=(3, 224, 224), order: str = "vh",
           **method_options) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with the chosen convs replaced by low-rank expansions, and a report.

    Parameters
    ----------
    model : any module; it is deep-copied and never modified.
    layers : 1-based positions among the ``nn.Conv2d`` modules in module order (the seed's
        "layers 2,3,4,5"), or qualified module names, or a mix.
    scheme : "v1" (:class:`LowRankExpConvV1`) or "v2" (:class:`LowRankExpConvV2`).
    ranks : one rank per layer (the seed's "#bases": M basis filters for v1, K channels for v2), or one
        int for all.
    basis : v1 only: "shared" or "per-channel".
    method : "svd", or "alternating" (v1 only) with ``method_options`` (lam, lam_start,
        lam_growth, iterations, tol; see :func:`lrx.decomposition.scheme1_alternating`).
    decomposed : v1 only: split every basis filter into dh x 1 and 1 x dw (the seed's "decomped").
    input_size : (C, H, W) of one image, for the MAC counts.
    order : v2 only: "vh" (vertical 1-D conv first, Tai et al.), "hv" (horizontal first) or "auto"
        (per layer, the order with fewer MACs; see :func:`lrx.layers.choose_order`).

    Returns
    -------
    (expanded model, report). ``report["spec"]`` is what :func:`build_expanded` needs;
    ``report["layers"]`` has per layer: index, name, shape [N, C, dh, dw], rank, max_rank,
    rel_error ||W - W_hat||_F / ||W||_F of the layer as built (after the rank-1 split if
    decomposed), macs_before, macs_after (one image, as ptflops counts the convs),
    mac_ratio = macs_before / macs_after, and for v1 energy_first_sv: per basis filter the
    share of its energy in its first singular value (per-channel: averaged over channels),
    taken before any rank-1 split; None for v2; and order ("vh"/"hv" for v2, None for v1).
    """
    check_choice(scheme, SCHEMES, "scheme")
    check_choice(basis, BASES, "basis")
    check_choice(method, METHODS, "method")
    if scheme == "v2" and (method != "svd" or decomposed or basis != "shared"):
        raise UserError("scheme v2 takes method 'svd', basis 'shared' and decomposed false only "
                        f"(got method {method!r}, basis {basis!r}, decomposed {decomposed}): its SVD is exact and "
                        "its filters are already separable")
    check_choice(order, ORDERS, "order")
    if scheme == "v1" and order != "vh":
        raise UserError(f"order {order!r} is scheme v2's choice of which 1-D conv runs first; scheme v1 takes none")
    chosen = select_layers(model, layers)
    ranks = _ranks(ranks, len(chosen))
    for (index, name, conv), rank in zip(chosen, ranks):  # every check before any work
        check_convertible(conv, scheme, decomposed, layer_label(index, name))
        check_rank(rank, conv, scheme, basis, order, layer_label(index, name))
    check_method_options(method, method_options)

    names = [name for _, name, _ in chosen]
    sizes = conv_sizes(model, names, input_size)
    new = copy.deepcopy(model)
    rows = []
    for (index, name, _), rank in zip(chosen, ranks):
        conv = new.get_submodule(name)
        weight = conv.weight.detach()
        energy = None
        if scheme == "v1":
            factors = scheme1(weight, rank, basis, method, **method_options)
            share = energy_first_sv(factors.bases)
            energy = (share if share.dim() == 1 else share.mean(0)).tolist()
            layer = LowRankExpConvV1.from_factors(conv, factors, decomposed=decomposed, basis=basis)
            layer_order = None
        else:
            layer = LowRankExpConvV2.from_conv(conv, rank, order=order, name=name)
            layer_order = layer.order
        w = weight.double()
        in_hw, out_hw = sizes[name]
        before = original_macs(conv, out_hw)
        after = expanded_macs(conv, scheme, rank, in_hw, out_hw, decomposed, layer_order or "vh")
        rows.append({
            "index": index, "name": name, "shape": list(weight.shape), "rank": rank,
            "max_rank": max_rank(conv, scheme, basis, layer_order or "vh"),
            "rel_error": ((w - layer.dense_weight()).norm() / w.norm().clamp_min(1e-300)).item(),
            "macs_before": before, "macs_after": after, "mac_ratio": before / after,
            "energy_first_sv": energy, "order": layer_order,
        })
        new.set_submodule(name, layer)
    spec = {"layers": names, "scheme": scheme, "ranks": list(ranks), "basis": basis, "decomposed": decomposed,
            "method": method, "method_options": dict(method_options)}
    if scheme == "v2":
        spec["orders"] = [row["order"] for row in rows]
    return new, {"spec": spec, "layers": rows}


def build_expanded(model: nn.Module, spec: dict) -> nn.Module:
    """A copy of ``model`` with the structure ``spec`` describes and default-initialised expansion layers.

    ``spec`` is ``expand``'s ``report["spec"]``; load the saved state_dict into the result. No
    decomposition is run.
    """
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise UserError(f"expansion spec lacks {', '.join(missing)}; it needs {', '.join(SPEC_KEYS)}")
    scheme, basis, decomposed = spec["scheme"], spec["basis"], bool(spec["decomposed"])
    check_choice(scheme, SCHEMES, "scheme")
    check_choice(basis, BASES, "basis")
    ranks = _ranks(spec["ranks"], len(spec["layers"]))
    orders = spec.get("orders") or ["vh"] * len(ranks)  # specs written before orders were recorded: vh
    new = copy.deepcopy(model)
    for (_, name, conv), rank, order in zip(select_layers(new, list(spec["layers"])), ranks, orders):
        check_convertible(conv, scheme, decomposed, name)
        new.set_submodule(name, _new_layer(conv, scheme, rank, basis, decomposed, order))
    return new
