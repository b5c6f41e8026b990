"""lrx.expand: the one call from Python that `lrx decompose` makes with a config (ranks planned from a target,
factors fitted to the filters or to data), with plain objects."""
import pytest
import torch
from torch import nn

import lrx
from lrx.base.errors import UserError
from lrx.expansion.model import expand as expand_at
from lrx.nn.models import build_model
from lrx.plan.macs import plan_ranks

SIZE = (3, 32, 32)


def tiny():
    torch.manual_seed(0)
    return build_model("tiny_cnn", 10)


def batches(n=4, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *SIZE, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def test_auto_ranks_with_a_target_are_plan_ranks_choice():
    model = tiny()
    fast, report = lrx.expand(model, layers=[2, 3], scheme="v2", ranks="auto", target={"speedup": 2.0},
                              input_size=SIZE)
    plan = plan_ranks(model, [2, 3], "v2", {"speedup": 2.0}, input_size=SIZE)
    assert report.ranks == plan["ranks"], "lrx.expand(ranks='auto') must use plan_ranks' choice"
    assert report.plan["predicted_speedup"] >= 2.0
    same, _ = expand_at(model, layers=[2, 3], scheme="v2", ranks=plan["ranks"], input_size=SIZE)
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(fast.eval()(x), same.eval()(x), msg="same ranks, same weights fit, same model")


def test_alignment_applies_to_a_mac_target():
    _, report = lrx.expand(tiny(), layers=[2, 3], scheme="v2", ranks="auto", target={"speedup": 1.5},
                           align=8, input_size=SIZE)
    for row, rank in zip(report.plan["layers"], report.ranks):
        assert rank % 8 == 0 or rank == row["max_rank"], f"rank {rank} of {row['name']} is not a multiple of 8"


def test_data_fit_with_an_auto_plan_ranks_by_output_energy_and_fits_to_the_data():
    data = batches()
    fast, report = lrx.expand(tiny(), layers=[2, 3], scheme="v2", ranks="auto", target={"speedup": 2.0},
                              fit="data", calibration=data, images=48, iterations=2, input_size=SIZE)
    assert report.plan["proxy"] == "output energy on the calibration images"
    assert report.fit_data["images"] == 48
    for row in report.layers:
        assert row["output_error"] <= row["output_error_weights"] + 1e-9, \
            f"{row['name']}: the data fit must not lose more output than the filter fit"


def test_a_dataloader_is_calibration_data():
    data = batches()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]),
                                                                        torch.cat([y for _, y in data])), batch_size=16)
    _, from_list = lrx.expand(tiny(), [2, 3], "v2", [4, 4], fit="data", calibration=data, images=32,
                              iterations=2, input_size=SIZE)
    _, from_loader = lrx.expand(tiny(), [2, 3], "v2", [4, 4], fit="data", calibration=loader, images=32,
                                iterations=2, input_size=SIZE)
    for a, b in zip(from_list.layers, from_loader.layers):
        assert a["output_error"] == pytest.approx(b["output_error"], rel=1e-6), "a DataLoader gives the list's fit"


class FakeTiming:
    """Every expanded layer at rank r takes r/max of the dense time: the plan depends only on the proxy."""
    batch, input_size = 2, SIZE
    device = torch.device("cpu")

    def key(self):
        return {"device": "fake"}

    def layer(self, conv, input_shape, ranks):
        top = min(conv.in_channels * conv.kernel_size[0], conv.out_channels * conv.kernel_size[1])
        return {"dense": 1.0, **{str(r): 0.1 + r / top for r in ranks}}

    def in_model(self, original, names):
        return {"total_ms": 1.0 + len(names), "ms": {n: 1.0 for n in names}}

    def whole(self, original, expanded):
        return {"original_ms": 10.0, "layout": "channels_last", "layouts": {"channels_last": 10.0},
                "expanded_ms": None if expanded is None else 5.0}


def test_a_latency_target_goes_through_the_planner_with_the_given_timing():
    _, report = lrx.expand(tiny(), layers="auto", scheme="v2", ranks="auto", target={"latency": 1.5},
                           timing=FakeTiming(), input_size=SIZE)
    assert "latency" in report.plan["target"]
    assert report.chosen_layers == report.plan["layers"]
    assert len(report.ranks) == len(report.chosen_layers) >= 1


@pytest.mark.parametrize("kwargs, words", [
    (dict(ranks="auto"), "pass target="),
    (dict(ranks=[4, 4], target={"speedup": 2.0}), "only with ranks 'auto'"),
    (dict(ranks=[4, 4], fit="data"), "needs calibration batches"),
    (dict(ranks=[4, 4], fit="filters"), "unknown fit 'filters'; allowed: weights, data"),
    (dict(ranks="auto", target={"speed": 2.0}), "speed"),
])
def test_bad_calls_say_what_to_pass(kwargs, words):
    with pytest.raises(UserError, match=words):
        lrx.expand(tiny(), [2, 3], "v2", input_size=SIZE, **kwargs)


def test_lrx_expand_is_lazy_and_unknown_names_are_refused():
    assert lrx.expand.__module__ == "lrx.expansion.model"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lrx.nope
