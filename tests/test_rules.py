"""One rule in one place: the maximum rank, the rank check and the MAC count, and the module layering."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from lrx.factor import decomposition

from lrx.nn import inference as speed
from lrx.base.errors import UserError
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2
from lrx.expansion.model import expand

LRX = Path(decomposition.__file__).parents[1]


# ------------------------------------------------------------------------------------ maximum rank


def test_max_rank_follows_the_order_of_scheme_2():
    shape = (8, 4, 3, 5)  # N, C, dh, dw: a non-square kernel, so the two orders differ
    vh, hv = decomposition.max_rank(shape, "v2", order="vh"), decomposition.max_rank(shape, "v2", order="hv")
    assert vh == min(4 * 3, 8 * 5) == 12, f"vh: min(C*dh, N*dw) = 12, got {vh}"
    assert hv == min(4 * 5, 8 * 3) == 20, f"hv: min(C*dw, N*dh) = 20, got {hv}"
    assert decomposition.max_rank(shape, "v2", order="auto") == max(vh, hv), "auto: the larger of the two orders"
    assert decomposition.max_rank(shape, "v2") == vh, "the default order is vh"
    conv = nn.Conv2d(4, 8, (3, 5))
    assert [decomposition.max_rank(conv, "v2", order=o) for o in ("vh", "hv", "auto")] == [12, 20, 20], \
        "a conv and its weight shape give the same maxima"


def test_max_rank_of_scheme_1_ignores_the_order():
    shape = (8, 4, 3, 5)
    for order in ("vh", "hv", "auto"):
        assert decomposition.max_rank(shape, "v1", "shared", order) == min(8 * 4, 15), f"shared, order {order}"
        assert decomposition.max_rank(shape, "v1", "per-channel", order) == min(8, 15), f"per-channel, order {order}"


def test_max_rank_refuses_unknown_choices():
    for args, word in [(("v3",), "v3"), (("v2", "shared", "vv"), "vv"), (("v1", "perchannel"), "perchannel")]:
        with pytest.raises(UserError, match=word):
            decomposition.max_rank((8, 4, 3, 5), *args)


# ------------------------------------------------------------------------------------- rank check


@pytest.mark.parametrize("rank", [0, -1, True, 2.5, "3", None, 13])
def test_check_rank_refuses_what_is_not_an_integer_in_range(rank):
    conv = nn.Conv2d(4, 6, 3)  # scheme 2, order vh: min(C*dh, N*dw) = 12
    with pytest.raises(UserError) as err:
        decomposition.check_rank(rank, conv, "v2", order="vh", name="conv2")
    message = str(err.value)
    assert message.startswith(f"layer conv2: rank {rank!r} is out of range; allowed 1..12"), \
        f"message {message!r} should name the layer, the bad rank and the range"
    assert "scheme v2, order vh" in message, f"message {message!r} should say what sets the maximum"


def test_check_rank_accepts_the_range_and_names_the_basis_for_scheme_1():
    shape = (6, 4, 3, 3)
    for rank in (1, 9):
        decomposition.check_rank(rank, shape, "v1", "shared")  # raises if refused
    with pytest.raises(UserError) as err:
        decomposition.check_rank(7, shape, "v1", "per-channel")
    assert str(err.value) == "rank 7 is out of range; allowed 1..6 (the maximum for scheme v1, basis per-channel)", \
        f"without a name no layer prefix, and scheme 1 names its basis: {str(err.value)!r}"


def entry_points():
    """Every place that takes a scheme 2 rank of a 4 -> 6, 3x3 conv (maximum 12, order vh)."""
    conv = nn.Conv2d(4, 6, 3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), conv)
    return {
        "scheme2_svd": lambda rank: decomposition.scheme2_svd(conv.weight.detach(), rank),
        "constructor": lambda rank: LowRankExpConvV2(4, 6, 3, rank),
        "from_conv": lambda rank: LowRankExpConvV2.from_conv(conv, rank, name="1"),
        "expand": lambda rank: expand(model, [2], "v2", [rank], input_size=(3, 8, 8)),
    }


@pytest.mark.parametrize("where", list(entry_points()))
@pytest.mark.parametrize("rank", [0, True, 13])
def test_every_entry_point_gives_the_same_rank_message(where, rank):
    with pytest.raises(UserError) as err:
        entry_points()[where](rank)
    tail = f"rank {rank!r} is out of range; allowed 1..12 (the maximum for scheme v2, order vh)"
    assert str(err.value).endswith(tail), f"{where}: message {str(err.value)!r} should end with {tail!r}"


def test_v1_constructor_checks_rank_against_the_shape():
    with pytest.raises(UserError, match=r"rank 10 is out of range; allowed 1\.\.9 \(the maximum for scheme v1, basis shared\)"):
        LowRankExpConvV1(4, 6, 3, 10)
    with pytest.raises(UserError, match=r"allowed 1\.\.6 .*basis per-channel"):
        LowRankExpConvV1(4, 6, 3, 7, basis="per-channel")
    assert LowRankExpConvV1(4, 6, 3, rank=9).rank == 9, "the constructor takes the rank as `rank`"


# ------------------------------------------------------------------------------------------- MACs


# Input sizes that are an exact multiple of the stride of the output (H = sh H', W = sw W'), so the
# intermediate of a 1-D conv holds exactly stride-many positions per output position.
@pytest.mark.parametrize("stride", [(1, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("form", ["v1", "v1 decomposed", "v2 vh", "v2 hv"])
def test_per_position_macs_are_expanded_macs_per_position(form, stride):
    conv = nn.Conv2d(4, 6, (3, 5), stride=stride, padding=(1, 2))
    scheme, decomposed, order = form.split()[0], "decomposed" in form, "hv" if "hv" in form else "vh"
    layer = (LowRankExpConvV2.from_conv(conv, 5, order=order) if scheme == "v2"
             else LowRankExpConvV1.from_conv(conv, 3, decomposed=decomposed))
    in_hw = (6 * stride[0], 5 * stride[1])
    out_hw = tuple(conv(torch.zeros(1, 4, *in_hw)).shape[-2:])
    assert out_hw == (6, 5), f"the geometry under test should give a 6 x 5 output, got {out_hw}"
    positions = out_hw[0] * out_hw[1]
    dense, factored = layer._macs_per_position()
    per_image = decomposition.expanded_macs(conv, scheme, layer.rank, in_hw, out_hw, decomposed, order, bias=False)
    assert factored * positions == per_image, f"{form} stride {stride}: {factored} per position x {positions} != {per_image}"
    original = decomposition.original_macs(conv, out_hw) - out_hw[0] * out_hw[1] * conv.out_channels  # less the bias
    assert dense * positions == original, f"{form} stride {stride}: dense {dense} per position x {positions} != {original}"


def test_expanded_macs_counts_the_bias_of_the_conv_only_when_asked():
    conv = nn.Conv2d(4, 6, 3)
    with_bias = decomposition.expanded_macs(conv, "v2", 2, (8, 8), (6, 6))
    assert with_bias - decomposition.expanded_macs(conv, "v2", 2, (8, 8), (6, 6), bias=False) == 6 * 6 * 6, \
        "the bias adds N H'W' when the conv has one"
    assert decomposition.expanded_macs(tuple(conv.weight.shape), "v2", 2, (8, 8), (6, 6)) == with_bias - 6 * 6 * 6, \
        "a weight shape has no bias"


# -------------------------------------------------------------------------------------- layering


def imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """(node, imported module as written, with leading dots) for every import anywhere in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            # `from . import layers` imports the module ".layers"
            found += [(node, module)] + [(node, module + alias.name) for alias in node.names if not node.module]
    return found


def test_speed_does_not_import_the_layers():
    names = [name for _, name in imports(ast.parse((LRX / "nn" / "inference.py").read_text()))]
    assert not any(name in (".layers", "lrx.nn.layers") or name.endswith(".layers") for name in names), \
        f"lrx/nn/inference.py imports the layers (a circle with layers.py): {names}"
    assert issubclass(LowRankExpConvV1, speed.Optimisable) and issubclass(LowRankExpConvV2, speed.Optimisable), \
        "the layers are found by speed.Optimisable"


@pytest.mark.parametrize("module", ["factor/decomposition", "nn/layers", "nn/surgery", "expansion/model", "plan/macs",
                                    "nn/inference"])
def test_imports_are_at_the_top(module):
    tree = ast.parse((LRX / f"{module}.py").read_text())
    top = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    nested = [node.lineno for node, _ in imports(tree) if id(node) not in top]
    assert not nested, f"lrx/{module}.py imports inside a function or class at line(s) {nested}"
    assert "dec" not in {alias.asname for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names}, \
        f"lrx/{module}.py imports a module as `dec` (the name of the decompose config elsewhere)"
