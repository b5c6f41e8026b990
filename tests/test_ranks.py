"""Ranks from a target: met within one rank step, never above a layer's maximum, chosen from spectra."""
import warnings

import pytest
import torch
from torch import nn

from lrx.factor import decomposition as dec
from lrx.base.errors import UserError
from lrx.expansion.model import expand
from lrx.nn.surgery import conv_sizes
from lrx.nn.models import alexnet_cifar10
from lrx.measure.profiling import count
from lrx.plan.macs import cheaper_ladder, plan_ranks

SIZE = (3, 224, 224)


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return alexnet_cifar10()


@pytest.fixture(scope="module")
def sizes(alexnet):
    return conv_sizes(alexnet, ["features.3", "features.6", "features.8", "features.10"], SIZE)


def rank_steps(model, sizes, plan, scheme, decomposed=False):
    """MACs saved by one rank step in each layer (the cost is linear in the rank)."""
    steps = []
    for row in plan["layers"]:
        conv = model.get_submodule(row["name"])
        in_hw, out_hw = sizes[row["name"]]
        steps.append(dec.expanded_macs(conv, scheme, 2, in_hw, out_hw, decomposed)
                     - dec.expanded_macs(conv, scheme, 1, in_hw, out_hw, decomposed))
    return steps


def check_plan(model, sizes, plan, scheme, budget, replaced_before=None, decomposed=False):
    after = sum(row["macs_after"] for row in plan["layers"])
    quantity = after if replaced_before is None else plan["predicted_macs"]
    assert quantity <= budget, f"target missed: {quantity} > budget {budget:.0f}"
    assert quantity + max(rank_steps(model, sizes, plan, scheme, decomposed)) > budget, \
        f"overshoot by more than one rank step: {quantity} vs budget {budget:.0f}"
    for row, rank in zip(plan["layers"], plan["ranks"]):
        assert 1 <= rank <= row["max_rank"], f"{row['name']}: rank {rank} outside 1..{row['max_rank']}"
        assert row["rank"] == rank
        conv = model.get_submodule(row["name"])
        expected = dec.retained_energy(conv.weight, scheme, plan["basis"])[rank - 1].item()
        assert row["retained_energy"] == pytest.approx(expected), f"{row['name']}: retained energy"


@pytest.mark.parametrize("speedup", [2.0, 4.0])
def test_speedup_target_scheme2(alexnet, sizes, speedup):
    plan = plan_ranks(alexnet, [2, 3, 4, 5], "v2", {"speedup": speedup}, input_size=SIZE)
    before = sum(row["macs_before"] for row in plan["layers"])
    check_plan(alexnet, sizes, plan, "v2", before / speedup)
    assert plan["predicted_speedup"] >= speedup, f"predicted {plan['predicted_speedup']:.3f}x < {speedup}x"
    assert plan["rule"].startswith("greedy"), "the result states its rule"


@pytest.mark.parametrize("scheme, basis, decomposed, fraction", [
    ("v1", "per-channel", False, 0.7), ("v1", "shared", True, 0.65), ("v2", "shared", False, 0.4),
])
def test_macs_fraction_target(alexnet, sizes, scheme, basis, decomposed, fraction):
    plan = plan_ranks(alexnet, [2, 3, 4, 5], scheme, {"macs": fraction}, input_size=SIZE, basis=basis,
                      decomposed=decomposed)
    check_plan(alexnet, sizes, plan, scheme, fraction * plan["model_macs_before"], replaced_before=True, decomposed=decomposed)


def test_plan_matches_the_expanded_model(alexnet, sizes):
    plan = plan_ranks(alexnet, [2, 3, 4, 5], "v2", {"speedup": 3.0}, input_size=SIZE)
    check_plan(alexnet, sizes, plan, "v2", sum(row["macs_before"] for row in plan["layers"]) / 3.0)
    expanded, report = expand(alexnet, [2, 3, 4, 5], "v2", plan["ranks"], input_size=SIZE)
    assert [r["macs_after"] for r in report.layers] == [r["macs_after"] for r in plan["layers"]], "per-layer MACs"
    assert count(expanded, SIZE)[0] == plan["predicted_macs"], "predicted_macs should be ptflops' count of the result"
    assert plan["model_macs_before"] == count(alexnet, SIZE)[0]


def test_spectra_decide_which_layer_gives_up_rank():
    """A layer whose weight is exactly rank 2 (scheme 2 matrix) drops to rank 2 before a random one loses any."""
    torch.manual_seed(0)
    low, flat = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        v, h = torch.randn(2, 16, 3, 1), torch.randn(16, 2, 1, 3)
        low.weight.copy_(dec.scheme2_weight(dec.Scheme2Factors(v, h)))
    model = nn.Sequential(low, nn.ReLU(), flat)
    plan = plan_ranks(model, [1, 2], "v2", {"speedup": 1.9}, input_size=(16, 12, 12))
    (r_low, r_flat), top = plan["ranks"], dec.max_rank(flat, "v2")
    assert r_low == 2, f"the rank-2 layer should keep exactly its 2 non-zero singular values, got {r_low}"
    assert plan["layers"][0]["retained_energy"] == pytest.approx(1.0), "rank 2 keeps all of its energy"
    assert r_flat < top, f"the target needs the random layer below its max too, got {r_flat} of {top}"


def small_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))


@pytest.mark.parametrize("target, words", [
    ({"speedup": 1000.0}, ["speedup 1000", "best reachable is", "x (rank 1"]),
    ({"macs": 0.05}, ["macs 0.05", "best reachable is", "of the model's MACs"]),
])
def test_unreachable_target_says_best_value(target, words):
    with pytest.raises(UserError) as err:
        plan_ranks(small_net(), [2, 3], "v1", target, input_size=(3, 16, 16))
    for word in words:
        assert word in str(err.value), f"message {str(err.value)!r} should mention {word!r}"


@pytest.mark.parametrize("target", [None, {}, {"speed": 2}, {"speedup": 0}, {"speedup": 0.5}, {"macs": -1}, {"macs": 1.5},
                                    {"speedup": 2, "macs": 0.5}])
def test_bad_targets(target):
    with pytest.raises(UserError, match="target"):
        plan_ranks(nn.Sequential(nn.Conv2d(3, 4, 3)), [1], "v2", target, input_size=(3, 8, 8))


def thin_first_conv() -> nn.Sequential:
    """A first conv 3 -> 32: scheme 2 at its maximum rank 9 costs 1.09x the conv's own MACs."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def test_no_layer_is_given_a_rank_that_costs_more_than_its_dense_conv():
    model, size = thin_first_conv(), (3, 16, 16)
    conv1 = model[0]
    assert dec.expanded_macs(conv1, "v2", 9, (16, 16), (16, 16)) > dec.original_macs(conv1, (16, 16)), \
        "the premise: conv1 at its maximum rank costs more than the dense conv"
    plan = plan_ranks(model, "auto", "v2", {"speedup": 2.0}, input_size=size)
    assert plan["predicted_speedup"] >= 2.0, "the target is still met"
    for row in plan["layers"]:
        assert row["macs_after"] < row["macs_before"], \
            f"{row['name']}: rank {row['rank']} costs {row['macs_after']} MACs, the dense conv {row['macs_before']}"
    for align in (1, 8, 32):
        ladder = cheaper_ladder(conv1, "v2", (16, 16), (16, 16), align)
        assert ladder and all(dec.expanded_macs(conv1, "v2", r, (16, 16), (16, 16)) < dec.original_macs(conv1, (16, 16))
                              for r in ladder), f"align {align}: every rung is cheaper than the conv: {ladder}"
    assert cheaper_ladder(conv1, "v2", (16, 16), (16, 16), 1)[-1] == 8, "the ladder tops out at the largest cheaper rank"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expand(model, "auto", "v2", "auto", target={"speedup": 2.0}, input_size=size)
    assert not [w for w in caught if "MACs" in str(w.message)], \
        f"no note about a rank that adds MACs: {[str(w.message) for w in caught]}"
