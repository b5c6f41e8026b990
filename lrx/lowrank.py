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
import fnmatch
import warnings
from typing import Sequence

import torch
from torch import nn

from .decomposition import (BASES, METHODS, ORDERS, SCHEMES, check_choice, check_rank, energy_first_sv,
                            expanded_macs, max_rank, original_macs, scheme1)
from .config import check_method_options, layer_pattern
from .errors import UserError
from .layers import LowRankExpConvV1, LowRankExpConvV2, adds_macs, check_convertible, unsupported_reason
from .models import conv_layers

__all__ = ["LowRankExpConvV1", "LowRankExpConvV2", "expand", "build_expanded", "select_layers", "conv_sizes"]

SPEC_KEYS = ("layers", "scheme", "ranks", "basis", "decomposed")


class ExpansionNote(UserWarning):
    """What :func:`expand` tells about its choice (``report["notes"]`` holds the same lines): a conv a
    pattern or ``auto`` skipped, a layer whose rank costs more MACs than the conv."""


def select_layers(model: nn.Module, layers: Sequence[int | str] | int | str, scheme: str = "v1",
                  decomposed: bool = False, notes: list[str] | None = None) -> list[tuple[int, str, nn.Conv2d]]:
    """The convs a ``layers`` list means: the one rule for ``decompose.layers`` and ``expand(layers=...)``.

    Each entry is a 1-based position among the model's ``nn.Conv2d`` modules (module order; the seed's
    "layers 2,3,4,5"), a qualified module name, a glob pattern on qualified names (``"layer3.*"``,
    :func:`fnmatch.fnmatchcase`), or ``"auto"``: every conv. A pattern or ``auto`` keeps the convs that
    ``scheme`` can replace and that can save MACs (:func:`lrx.layers.unsupported_reason`,
    :func:`lrx.layers.adds_macs` at rank 1) and skips the others, appending one line per skipped conv to
    ``notes``; a conv named by index or name is taken as given (``expand`` then refuses what it cannot
    replace). Returns (1-based index, qualified name, conv) per chosen conv: entries in the order given,
    a pattern's matches in module order. A conv chosen twice is refused.
    """
    convs = conv_layers(model)
    by_name = {name: i for i, (name, _) in enumerate(convs)}
    if isinstance(layers, (int, str)):
        layers = [layers]
    if not layers:
        raise UserError("no layers to expand: give 1-based conv indices, module names, glob patterns or 'auto'")
    chosen = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise UserError(f"layer {layer!r} must be a 1-based conv index, a module name, a glob pattern or 'auto'")
        if isinstance(layer, int):
            if not 1 <= layer <= len(convs):
                raise UserError(f"layer {layer} does not exist: the model has {len(convs)} conv layers "
                                f"(indices 1..{len(convs)})")
            chosen.append((layer, *convs[layer - 1]))
        elif layer in by_name:
            chosen.append((by_name[layer] + 1, *convs[by_name[layer]]))
        elif layer_pattern(layer):
            chosen += _matching(convs, layer, scheme, decomposed, notes)
        else:
            raise UserError(f"no conv layer named {layer!r}; conv layers: {_shown(by_name)} "
                            "(or a glob pattern such as 'layer3.*', or 'auto')")
    names = [name for _, name, _ in chosen]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"layer(s) {', '.join(repeated)} given more than once")
    return chosen


def _shown(names) -> str:
    names = list(names)
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")


def _matching(convs, pattern: str, scheme: str, decomposed: bool, notes: list[str] | None) -> list:
    """The convs ``pattern`` (a glob or "auto") selects that ``scheme`` can replace; notes for the rest."""
    matched = [(i + 1, name, conv) for i, (name, conv) in enumerate(convs)
               if pattern == "auto" or fnmatch.fnmatchcase(name, pattern)]
    if not matched:
        raise UserError(f"pattern {pattern!r} matches no conv layer; conv layers: {_shown(n for n, _ in convs)}")
    kept, skipped = [], []
    for index, name, conv in matched:
        reason = unsupported_reason(conv, scheme, decomposed)
        if reason is None and adds_macs(conv, scheme, 1, decomposed):
            reason = f"scheme {scheme} costs more MACs than the conv even at rank 1"
        if reason is None:
            kept.append((index, name, conv))
        else:
            skipped.append(f"layer {layer_label(index, name)} skipped: {reason}")
    if notes is not None:
        notes.extend(skipped)
    if not kept:
        raise UserError(f"{pattern!r} selects no conv that scheme {scheme} can replace: "
                        + "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""))
    return kept


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


def _ranks(ranks, count: int, names: Sequence[str] = ()) -> list:
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        return [ranks] * count
    if isinstance(ranks, (str, dict)):
        hint = "pass plan['ranks']" if isinstance(ranks, dict) else "for ranks from a target call lrx.expand(..., ranks='auto', target=...)"
        raise UserError(f"ranks {ranks if isinstance(ranks, str) else 'of a dict'!r}: give one rank per layer ({hint})")
    ranks = list(ranks)
    if len(ranks) != count:
        chosen = f" ({_shown(names)})" if names else ""
        raise UserError(f"{len(ranks)} ranks given for {count} layers{chosen}: give one rank per layer")
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
        "layers 2,3,4,5"), qualified module names, glob patterns (``"layer3.*"``) or ``"auto"``, or a mix
        (:func:`select_layers`; what a pattern skips is in ``report["notes"]`` and warned as
        :class:`ExpansionNote`).
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
    ``report["notes"]``: one line per conv a pattern skipped and per layer whose rank adds MACs.
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
    notes: list[str] = []
    chosen = select_layers(model, layers, scheme, decomposed, notes)
    ranks = _ranks(ranks, len(chosen), [name for _, name, _ in chosen])
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
        if after > before:
            notes.append(f"layer {layer_label(index, name)}: rank {rank} costs {after / before:.2f}x the conv's MACs "
                         f"(MAC ratio {before / after:.2f}); a lower rank saves MACs")
        new.set_submodule(name, layer)
    spec = {"layers": names, "scheme": scheme, "ranks": list(ranks), "basis": basis, "decomposed": decomposed,
            "method": method, "method_options": dict(method_options)}
    if scheme == "v2":
        spec["orders"] = [row["order"] for row in rows]
    for note in notes:
        warnings.warn(note, ExpansionNote, stacklevel=2)
    return new, {"spec": spec, "layers": rows, "notes": notes}


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
