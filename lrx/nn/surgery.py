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
from lrx.factor.channel import channel_max_rank, check_channel_rank
from lrx.factor.choices import AUTO, CHANNEL, EXPANSIONS, TUCKER
from lrx.factor.decomposition import BASES, SCHEMES, check_choice, check_rank, max_rank
from lrx.factor.tucker import check_tucker2_rank, tucker2_max_rank
from lrx.nn.channel import LowRankChannel, channel_shape, channel_unsupported_reason, check_channel_layer
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2, adds_macs, check_convertible, unsupported_reason
from lrx.nn.models import conv_layers
from lrx.nn.tucker import LowRankTucker2, check_tucker2_layer, tucker2_unsupported_reason

__all__ = ["layer_scheme", "replace_reason", "check_layer", "layer_max_rank", "check_layer_rank", "select_layers",
           "layer_label", "shown_name", "summarise_notes", "conv_sizes", "per_layer_ranks", "new_layer", "build_expanded", "SPEC_KEYS"]

SPEC_KEYS = ("layers", "scheme", "ranks", "basis", "decomposed")


def layer_scheme(module: nn.Module, scheme: str) -> str:
    """The scheme that replaces ``module`` in an expansion of ``scheme``: ``scheme`` itself, or for ``"auto"`` the
    channel scheme for a 1x1 conv or a linear layer and scheme v2 for a conv with a larger kernel."""
    if scheme != AUTO:
        return scheme
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)):
        return CHANNEL
    return "v2"


def replace_reason(module: nn.Module, scheme: str, decomposed: bool = False) -> str | None:
    """Why an expansion of ``scheme`` cannot replace ``module`` usefully (one phrase), or None: what ``auto`` and
    patterns skip. The scheme's own rule (:func:`lrx.nn.layers.unsupported_reason`,
    :func:`lrx.nn.channel.channel_unsupported_reason`), and a layer that costs more MACs even at rank 1."""
    own = layer_scheme(module, scheme)
    if own == CHANNEL:
        reason = channel_unsupported_reason(module)
        if reason is None and channel_max_rank(channel_shape(module)) == 1:
            reason = "one input or output channel: the channel scheme costs more MACs at every rank"
        return reason
    if own == TUCKER:
        return tucker2_unsupported_reason(module)
    reason = unsupported_reason(module, own, decomposed)
    if reason is None and adds_macs(module, own, 1, decomposed):
        reason = f"scheme {own} costs more MACs than the conv even at rank 1"
    return reason


def check_layer(module: nn.Module, scheme: str, decomposed: bool = False, name: str | None = None) -> None:
    """Refuse, with a UserError naming the layer, a module an expansion of ``scheme`` cannot replace (a 3x3 or a
    grouped conv for the channel scheme, a 1x1 conv for scheme v2, ...)."""
    own = layer_scheme(module, scheme)
    if own == CHANNEL:
        check_channel_layer(module, name)
    elif own == TUCKER:
        check_tucker2_layer(module, name)
    else:
        check_convertible(module, own, decomposed, name)


def layer_max_rank(module: nn.Module, scheme: str, basis: str = "shared", order: str = "vh") -> int:
    """The largest useful rank of ``module`` in an expansion of ``scheme`` (where it is exact):
    :func:`lrx.factor.decomposition.max_rank` for a conv scheme, min(C, N) for the channel scheme, max(C, N)
    for Tucker-2."""
    own = layer_scheme(module, scheme)
    if own == CHANNEL:
        return channel_max_rank(channel_shape(module))
    if own == TUCKER:
        return tucker2_max_rank(module.weight.shape)
    return max_rank(module, own, basis, order)


def check_layer_rank(rank, module: nn.Module, scheme: str, basis: str = "shared", order: str = "vh",
                     name: str | None = None) -> None:
    """Refuse, with a UserError naming the layer and the allowed ranks, a rank out of 1..:func:`layer_max_rank`."""
    own = layer_scheme(module, scheme)
    if own == CHANNEL:
        check_channel_rank(rank, channel_shape(module), name=name)
    elif own == TUCKER:
        check_tucker2_rank(rank, module.weight.shape, name)
    else:
        check_rank(rank, module, own, basis, order, name)


def _candidates(model: nn.Module, scheme: str) -> list[tuple[int | None, str, nn.Module]]:
    """(1-based conv index or None, name, module) of what ``layers`` entries of ``scheme`` are matched against,
    in module order: the convs (schemes v1, v2), and for the channel scheme and ``auto`` the linear layers too
    (a linear layer has no index: indices count convs, whatever the scheme). Convs and linear layers inside
    an expansion layer are left out."""
    inner = {f"{name}.{part}" for name, m in model.named_modules() if isinstance(m, LowRankChannel)
             for part in ("first", "second")}
    inner |= {f"{name}.{part}" for name, m in model.named_modules() if isinstance(m, LowRankTucker2)
              for part in ("first", "core", "last")}
    index = {name: i + 1 for i, (name, _) in enumerate(conv_layers(model))}
    kinds = (nn.Conv2d,) if _convs_only(scheme) else (nn.Conv2d, nn.Linear)
    return [(index.get(name), name, m) for name, m in model.named_modules()
            if isinstance(m, kinds) and name not in inner]


def _convs_only(scheme: str) -> bool:
    """Whether ``scheme`` replaces convs only (schemes v1, v2 and Tucker-2), not linear layers."""
    return scheme in SCHEMES or scheme == TUCKER


def select_layers(model: nn.Module, layers: Sequence[int | str] | int | str, scheme: str = "v1",
                  decomposed: bool = False, notes: list[str] | None = None) -> list[tuple[int | None, str, nn.Module]]:
    """The layers a ``layers`` list means: the one rule for ``decompose.layers`` and ``expand(layers=...)``.

    Each entry is a 1-based position among the model's ``nn.Conv2d`` modules (module order; the seed's
    "layers 2,3,4,5"), a qualified module name, a glob pattern on qualified names (``"layer3.*"``,
    :func:`fnmatch.fnmatchcase`), or ``"auto"``: every candidate. Candidates are the convs; with
    ``scheme="channel"`` or ``"auto"`` also the ``nn.Linear`` layers (chosen by name or pattern: indices count
    convs only). A pattern or ``auto`` keeps the layers that ``scheme`` can replace and that can save MACs
    (:func:`replace_reason`) and skips the others, appending one line per skipped layer to ``notes``; a layer
    named by index or name is taken as given (``expand`` then refuses what it cannot replace). Returns
    (1-based conv index, or None for a linear layer, qualified name, module) per chosen layer: entries in the
    order given, a pattern's matches in module order. A layer chosen twice is refused.
    """
    check_choice(scheme, EXPANSIONS, "scheme")
    convs = conv_layers(model)
    candidates = _candidates(model, scheme)
    by_name = {name: (index, module) for index, name, module in candidates}
    what = ("conv layer", "conv layers") if _convs_only(scheme) else ("conv or linear layer", "conv and linear layers")
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
                linear = "" if _convs_only(scheme) else "; linear layers are chosen by name or pattern"
                raise UserError(f"layer {layer} does not exist: the model has {len(convs)} conv layers "
                                f"(indices 1..{len(convs)}){linear}")
            chosen.append((layer, *convs[layer - 1]))
        elif layer in by_name:
            chosen.append((by_name[layer][0], layer, by_name[layer][1]))
        elif layer_pattern(layer):
            chosen += _matching(candidates, layer, scheme, decomposed, notes, what)
        else:
            raise UserError(f"no {what[0]} named {layer!r}; {what[1]}: {_shown(by_name)} "
                            "(or a glob pattern such as 'layer3.*', or 'auto')")
    names = [name for _, name, _ in chosen]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"layer(s) {', '.join(repeated)} given more than once")
    return chosen


def _shown(names) -> str:
    names = list(names)
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")


def _matching(candidates, pattern: str, scheme: str, decomposed: bool, notes: list[str] | None,
              what: tuple[str, str]) -> list:
    """The layers ``pattern`` (a glob or "auto") selects that ``scheme`` can replace; notes for the rest."""
    matched = [(index, name, module) for index, name, module in candidates
               if pattern == "auto" or fnmatch.fnmatchcase(name, pattern)]
    if not matched:
        raise UserError(f"pattern {pattern!r} matches no {what[0]}; {what[1]}: {_shown(n for _, n, _ in candidates)}")
    kept, skipped = [], []
    for index, name, module in matched:
        reason = replace_reason(module, scheme, decomposed)
        if reason is None:
            kept.append((index, name, module))
        else:
            skipped.append(f"layer {layer_label(index, name)} skipped: {reason}")
    if notes is not None:
        notes.extend(skipped)
    if not kept:
        noun = "conv" if _convs_only(scheme) else "layer"
        raise UserError(f"{pattern!r} selects no {noun} that scheme {scheme} can replace: "
                        + "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""))
    return kept


def layer_label(index: int | None, name: str) -> str:
    """How messages name a chosen layer: its 1-based position among the convs (the seed's "layer 2") and its
    module name; a linear layer (no index) by its quoted name alone."""
    return repr(name) if index is None else f"{index} ({name!r})"


def shown_name(name: str) -> str:
    """A module name as lrx prints it in tables and lists: as it is (``features.0.0``), or quoted where every
    part is a number (``'0.0'``, ``'3'``: the modules of an ``nn.Sequential``), so that it does not read as
    a number, and as a YAML ``layers:`` list needs it written."""
    return repr(name) if name and all(part.isdigit() for part in name.split(".")) else name


# How _matching words a conv it skips; summarise_notes reads it back.
_SKIPPED = re.compile(r"layer (?:\d+ \()?(?P<name>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\)? skipped: (?P<reason>.*)",
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


def new_layer(module: nn.Module, scheme: str, rank: int, basis: str, decomposed: bool, order: str = "vh") -> nn.Module:
    """An expansion layer with ``module``'s geometry, default-initialised, on its device and dtype: of the scheme
    that replaces it in an expansion of ``scheme`` (:func:`layer_scheme`)."""
    own = layer_scheme(module, scheme)
    if own == CHANNEL:
        return LowRankChannel.like(module, rank)
    if own == TUCKER:
        return LowRankTucker2.like(module, rank)
    geometry = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                    bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
    if own == "v1":
        return LowRankExpConvV1(module.in_channels, module.out_channels, module.kernel_size, rank,
                                decomposed=decomposed, basis=basis, **geometry)
    return LowRankExpConvV2(module.in_channels, module.out_channels, module.kernel_size, rank, order=order or "vh",
                            **geometry)


def build_expanded(model: nn.Module, spec: dict) -> nn.Module:
    """A copy of ``model`` with the structure ``spec`` describes and default-initialised expansion layers.

    ``spec`` is ``expand``'s ``report.spec``; load the saved state_dict into the result. No
    decomposition is run. With scheme ``auto`` each layer's scheme follows from the layer (:func:`layer_scheme`),
    or from ``spec["schemes"]`` (one per layer) where a plan chose among schemes (Tucker-2 for a conv).
    """
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise UserError(f"expansion spec lacks {', '.join(missing)}; it needs {', '.join(SPEC_KEYS)}")
    scheme, basis, decomposed = spec["scheme"], spec["basis"], bool(spec["decomposed"])
    check_choice(scheme, EXPANSIONS, "scheme")
    check_choice(basis, BASES, "basis")
    ranks = per_layer_ranks(spec["ranks"], len(spec["layers"]))
    orders = spec.get("orders") or ["vh"] * len(ranks)  # specs written before orders were recorded: vh
    schemes = spec.get("schemes") or [scheme] * len(ranks)
    if len(schemes) != len(ranks) or any(own not in (scheme, TUCKER) for own in schemes):
        raise UserError(f"expansion spec's schemes {schemes!r} must list {len(ranks)} of {scheme!r} or {TUCKER!r}")
    new = copy.deepcopy(model)
    chosen = select_layers(new, list(spec["layers"]), scheme)
    for (index, name, module), rank, order, own in zip(chosen, ranks, orders, schemes):
        check_layer(module, own, decomposed, name)
        new.set_submodule(name, new_layer(module, own, rank, basis, decomposed, order))
    return new
