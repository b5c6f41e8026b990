"""Model surgery: which convs a ``layers`` list means, where they sit (their input and output sizes), and an
expansion's structure rebuilt from its spec without rerunning a decomposition::

    again = build_expanded(build_model("alexnet_cifar10"), saved["spec"])   # spec: lrx.expand's report.spec
    again.load_state_dict(saved["model"])
"""
from __future__ import annotations

import ast
import copy
import fnmatch
import re
from typing import Sequence

import torch
from torch import nn

from lrx.base.errors import UserError
from lrx.config.settings import layer_pattern
from lrx.factor.decomposition import BASES, SCHEMES, check_choice
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2, adds_macs, check_convertible, unsupported_reason
from lrx.nn.models import conv_layers

__all__ = ["select_layers", "layer_label", "shown_name", "summarise_notes", "conv_sizes", "per_layer_ranks", "new_layer", "build_expanded", "SPEC_KEYS"]

SPEC_KEYS = ("layers", "scheme", "ranks", "basis", "decomposed")


def select_layers(model: nn.Module, layers: Sequence[int | str] | int | str, scheme: str = "v1",
                  decomposed: bool = False, notes: list[str] | None = None) -> list[tuple[int, str, nn.Conv2d]]:
    """The convs a ``layers`` list means: the one rule for ``decompose.layers`` and ``expand(layers=...)``.

    Each entry is a 1-based position among the model's ``nn.Conv2d`` modules (module order; the seed's
    "layers 2,3,4,5"), a qualified module name, a glob pattern on qualified names (``"layer3.*"``,
    :func:`fnmatch.fnmatchcase`), or ``"auto"``: every conv. A pattern or ``auto`` keeps the convs that
    ``scheme`` can replace and that can save MACs (:func:`lrx.nn.layers.unsupported_reason`,
    :func:`lrx.nn.layers.adds_macs` at rank 1) and skips the others, appending one line per skipped conv to
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


def shown_name(name: str) -> str:
    """A module name as lrx prints it in tables and lists: as it is (``features.0.0``), or quoted where every
    part is a number (``'0.0'``, ``'3'``: the modules of an ``nn.Sequential``), so that it does not read as
    a number, and as a YAML ``layers:`` list needs it written."""
    return repr(name) if name and all(part.isdigit() for part in name.split(".")) else name


# How _matching words a conv it skips; summarise_notes reads it back.
_SKIPPED = re.compile(r"layer (?P<index>\d+) \((?P<name>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\) skipped: (?P<reason>.*)",
                      re.S)


def summarise_notes(notes: Sequence[str], listed_in: str = "report.notes", names: int = 3) -> list[str]:
    """``notes`` with the skipped convs (:func:`select_layers`'s notes) grouped: one line per reason, with
    how many convs and the first ``names`` of them ("and N more", each in ``listed_in``); a number that
    differs within a reason (depthwise convs of 16 and 72 groups) is shown as its range. Other notes, and a
    reason of one conv, stay as they are."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    out: list = []
    for note in notes:
        match = _SKIPPED.fullmatch(note)
        if match is None:
            out.append(note)
            continue
        key = re.sub(r"\d+", "#", match["reason"])
        if key not in groups:
            groups[key] = []
            out.append(key)  # the group's place among the notes
        groups[key].append((ast.literal_eval(match["name"]), match["reason"], note))
    lines = []
    for item in out:
        if item not in groups:
            lines.append(item)
            continue
        members = groups[item]
        if len(members) == 1:
            lines.append(members[0][2])
            continue
        shown = ", ".join(repr(name) for name, _, _ in members[:names])
        more = f" and {len(members) - names} more (each in {listed_in})" if len(members) > names else ""
        lines.append(f"{len(members)} convs skipped: {_merged([reason for _, reason, _ in members])}: {shown}{more}")
    return lines


def _merged(reasons: list[str]) -> str:
    """One reason for reasons that differ only in their numbers: each differing number as low..high."""
    parts = [re.split(r"(\d+)", reason) for reason in reasons]
    out = []
    for i, piece in enumerate(parts[0]):
        values = sorted({int(p[i]) for p in parts}) if i % 2 else [piece]
        out.append(str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}")
    return "".join(out)


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


def per_layer_ranks(ranks, count: int, names: Sequence[str] = ()) -> list:
    """One rank per layer from ``ranks`` (one int for all, or a list of ``count``); the one check of their count."""
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


def new_layer(conv: nn.Conv2d, scheme: str, rank: int, basis: str, decomposed: bool, order: str = "vh") -> nn.Module:
    """An expansion layer with ``conv``'s geometry, default-initialised, on its device and dtype."""
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    if scheme == "v1":
        return LowRankExpConvV1(conv.in_channels, conv.out_channels, conv.kernel_size, rank,
                                decomposed=decomposed, basis=basis, **geometry)
    return LowRankExpConvV2(conv.in_channels, conv.out_channels, conv.kernel_size, rank, order=order, **geometry)


def build_expanded(model: nn.Module, spec: dict) -> nn.Module:
    """A copy of ``model`` with the structure ``spec`` describes and default-initialised expansion layers.

    ``spec`` is ``expand``'s ``report.spec``; load the saved state_dict into the result. No
    decomposition is run.
    """
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise UserError(f"expansion spec lacks {', '.join(missing)}; it needs {', '.join(SPEC_KEYS)}")
    scheme, basis, decomposed = spec["scheme"], spec["basis"], bool(spec["decomposed"])
    check_choice(scheme, SCHEMES, "scheme")
    check_choice(basis, BASES, "basis")
    ranks = per_layer_ranks(spec["ranks"], len(spec["layers"]))
    orders = spec.get("orders") or ["vh"] * len(ranks)  # specs written before orders were recorded: vh
    new = copy.deepcopy(model)
    for (_, name, conv), rank, order in zip(select_layers(new, list(spec["layers"])), ranks, orders):
        check_convertible(conv, scheme, decomposed, name)
        new.set_submodule(name, new_layer(conv, scheme, rank, basis, decomposed, order))
    return new
