"""Tucker-2 (lrx.factor.tucker, lrx.nn.tucker): exact at full ranks, the HOSVD's error bound, the layer computes
what its dense weight computes, bad ranks refused; the scheme tucker2 (one rank per layer): its energy and MACs,
the data fit, a MAC plan, a run fitted to data and exported, bad configs."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import lrx
import lrx.plan.macs
from lrx.base.errors import UserError
from lrx.cli import app
from lrx.factor.datafit import _moments, collect_stats, fit_tucker2, output_error, tucker2_output_energy
from lrx.factor.tucker import (tucker2_energy, tucker2_hosvd, tucker2_macs, tucker2_max_rank, tucker2_ranks,
                               tucker2_weight)
from lrx.measure.profiling import count
from lrx.nn.models import build_model
from lrx.nn.surgery import build_expanded
from lrx.nn.tucker import LowRankTucker2


def conv(c=6, n=8, k=3, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(c, n, k, **kw).double()


@pytest.mark.parametrize("options", [dict(padding=1), dict(stride=2, padding=1), dict(dilation=2, padding=2),
                                     dict(padding=1, padding_mode="reflect"), dict(bias=False)],
                         ids=["padding", "stride", "dilation", "reflect", "no bias"])
def test_full_ranks_are_exact(options):
    layer = conv(**options)
    tucker = LowRankTucker2.from_conv(layer, (6, 8))
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    assert torch.allclose(tucker(x), layer(x), atol=1e-10), "R1 = C, R2 = N reproduce the conv"
    assert torch.allclose(tucker.dense_weight(), layer.weight, atol=1e-12)


def test_the_layer_computes_what_its_dense_weight_computes_at_low_ranks():
    layer = conv(padding=1)
    tucker = LowRankTucker2.from_conv(layer, (3, 4))
    dense = nn.Conv2d(6, 8, 3, padding=1).double()
    dense.weight.data.copy_(tucker.dense_weight())
    dense.bias.data.copy_(layer.bias)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    assert torch.allclose(tucker(x), dense(x), atol=1e-10)
    assert [type(m) for m in tucker] == [nn.Conv2d] * 3 and tucker.ranks == (3, 4)


def test_hosvd_error_falls_with_rank_and_is_within_its_bound():
    torch.manual_seed(1)
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    errors = []
    for r in (2, 4, 8, 12):
        approx = tucker2_weight(tucker2_hosvd(w, (r, min(16, r + 4))))
        errors.append(float((w - approx).norm() / w.norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0], errors
    # HOSVD: ||W - W_hat||^2 <= the energy dropped along each mode, summed.
    r1, r2 = 4, 6
    s_out = torch.linalg.svdvals(w.reshape(16, -1))
    s_in = torch.linalg.svdvals(w.transpose(0, 1).reshape(12, -1))
    bound = (s_out[r2:] ** 2).sum() + (s_in[r1:] ** 2).sum()
    err = (w - tucker2_weight(tucker2_hosvd(w, (r1, r2)))).norm() ** 2
    assert err <= bound + 1e-9, (float(err), float(bound))


@pytest.mark.parametrize("ranks, message", [((0, 4), "out of range"), ((7, 4), "R1 is 1..6"), ((3, 9), "R2 is 1..8"),
                                            ((3,), "two integers"), ("ab", "two integers")])
def test_bad_ranks_are_refused_naming_the_range(ranks, message):
    with pytest.raises(ValueError, match=message):
        LowRankTucker2.from_conv(conv(), ranks)


def test_grouped_convs_are_refused():
    with pytest.raises(ValueError, match="groups=1"):
        LowRankTucker2.from_conv(nn.Conv2d(4, 4, 3, groups=2), (2, 2))


# ------------------------------------------------------------------ one rank per layer: the scheme tucker2


def test_rank_r_keeps_its_share_of_both_sides_and_the_energy_is_the_hosvds():
    layer = conv(c=6, n=16, padding=1, stride=2)
    assert tucker2_max_rank(layer.weight.shape) == 16
    assert [tucker2_ranks(r, layer.weight.shape) for r in (1, 8, 16)] == [(1, 1), (3, 8), (6, 16)]
    energy = tucker2_energy(layer.weight)
    for r in range(1, 17):
        approx = tucker2_weight(tucker2_hosvd(layer.weight, tucker2_ranks(r, layer.weight.shape)))
        kept = 1 - float((approx - layer.weight).norm() / layer.weight.norm()) ** 2
        assert abs(kept - float(energy[r - 1])) < 1e-9, f"rank {r}: {kept} vs {float(energy[r - 1])}"
    assert float(energy[-1]) == pytest.approx(1.0) and all(torch.diff(energy) >= -1e-12), "exact at the top, monotone"
    for r in (1, 5, 16):
        tucker = LowRankTucker2.from_conv(layer.float(), tucker2_ranks(r, layer.weight.shape))
        assert count(nn.Sequential(tucker), (6, 9, 9))[0] == tucker2_macs(layer.weight.shape, r, (9, 9), (5, 5), True), \
            "the planners' MACs are ptflops'"


def second_conv_stats(seed: int, batch: int, batches: int):
    """(weight, patch statistics) of the 8 -> 12 conv of a two-conv net on ``batches`` random batches."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1)).eval()
    data = [(torch.randn(batch, 3, 10, 10), torch.zeros(batch)) for _ in range(batches)]
    return model[2].weight.detach(), collect_stats(model, ["2"], data, images=batch * batches)["2"]


def test_the_data_fit_lowers_the_output_error_below_the_hosvds_and_is_exact_at_full_rank():
    weight, stats = second_conv_stats(seed=1, batch=8, batches=3)
    for rank in (3, 6):
        start = tucker2_weight(tucker2_hosvd(weight, tucker2_ranks(rank, weight.shape)))
        history = []
        fitted = tucker2_weight(fit_tucker2(weight, rank, stats, iterations=30, tol=0.0, history=history))
        assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(history, history[1:])), f"monotone: {history}"
        assert output_error(weight, fitted, stats) < output_error(weight, start, stats), f"rank {rank}: better than HOSVD"
    full = tucker2_weight(fit_tucker2(weight, 12, stats))
    assert output_error(weight, full, stats) < 1e-4, "full rank reproduces the outputs"
    with pytest.raises(UserError, match="1..12"):
        fit_tucker2(weight, 13, stats)


def _best_given_hosvd_input(weight, stats, rank) -> float:
    """The least output error of Tucker-2 at ``rank`` with the HOSVD's input factor, found another way: every N x R1 k^2
    matrix M of rank R2 acting on the projected patches, by the truncated SVD of the least-squares solution in the
    metric of the projected covariance (eigendecomposition, no Cholesky), as a share of the output energy."""
    m = _moments(weight, stats)
    n, c, kh, kw = weight.shape
    r1, r2 = tucker2_ranks(rank, weight.shape)
    first = tucker2_hosvd(weight.double(), (r1, r2)).first[:, :, 0, 0]
    a = torch.kron(first, torch.eye(kh * kw, dtype=torch.float64))
    s, t = a @ m.svv @ a.T, m.target @ a.T
    values, vectors = torch.linalg.eigh(s)
    root = vectors @ torch.diag(values.clamp_min(1e-12).sqrt()) @ vectors.T
    u, sv, vh = torch.linalg.svd(t @ torch.linalg.inv(root))
    best = (u[:, :r2] * sv[:r2]) @ vh[:r2] @ torch.linalg.inv(root)  # N x R1 k^2, rank R2
    return m.error(best @ a) / m.energy


def test_tucker2s_output_energy_is_the_least_error_its_input_factor_allows_and_the_data_fit_approaches_it():
    weight, stats = second_conv_stats(seed=2, batch=16, batches=4)
    shares = tucker2_output_energy(weight, stats)
    assert len(shares) == 12 and shares[-1] == 1.0, shares
    assert all(b >= a - 1e-12 for a, b in zip(shares, shares[1:])), f"non-decreasing: {shares}"
    assert tucker2_output_energy(weight, stats, [6, 3]) == [shares[5], shares[2]], "any ranks, in their order"
    for rank in (3, 6, 9):
        lost = 1.0 - shares[rank - 1]
        assert lost == pytest.approx(_best_given_hosvd_input(weight, stats, rank), rel=1e-4, abs=1e-8), rank
        hosvd = tucker2_weight(tucker2_hosvd(weight, tucker2_ranks(rank, weight.shape)))
        fitted = tucker2_weight(fit_tucker2(weight, rank, stats, iterations=50, tol=0.0))
        assert lost <= output_error(weight, fitted, stats) ** 2 * (1 + 1e-6) < output_error(weight, hosvd, stats) ** 2
    energy = tucker2_energy(weight)
    assert any(abs(shares[r] - float(energy[r])) > 0.01 for r in range(11)), "the data, not the filters, decide"
    with pytest.raises(UserError, match="1..12"):
        tucker2_output_energy(weight, stats, [13])


def test_scheme_tucker2_is_exact_at_full_rank_plans_a_mac_target_and_rebuilds_from_its_spec():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=10).eval()
    x = torch.randn(4, 3, 16, 16)
    exact, report = lrx.expand(model, "auto", "tucker2", [16, 32, 32, 32], input_size=(3, 16, 16))
    with torch.no_grad():
        assert torch.allclose(exact(x), model(x), atol=1e-5), "full ranks: the same model"
    assert [row["tucker_ranks"] for row in report.layers] == [[3, 16], [16, 32], [32, 32], [32, 32]]
    planned, plan = lrx.expand(model, "auto", "tucker2", "auto", target={"speedup": 2.0}, input_size=(3, 16, 16))
    assert plan.plan["predicted_speedup"] >= 2.0 and all(isinstance(m, LowRankTucker2) for m in
                                                           (planned.get_submodule(n) for n in plan.spec["layers"]))
    again = build_expanded(model, plan.spec)
    again.load_state_dict(planned.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), planned(x)), "the spec rebuilds the structure"
    assert count(planned, (3, 16, 16))[0] == plan.plan["predicted_macs"], "the plan's MACs are ptflops'"


def tucker_shaped(c=32, inner=3, convs=2) -> nn.Sequential:
    """Convs C -> C (3x3) whose filters are exactly Tucker-2 of ranks (inner, inner): scheme 2 needs rank 3 x inner."""
    torch.manual_seed(3)
    layers = []
    for _ in range(convs):
        layer = nn.Conv2d(c, c, 3, padding=1)
        core = torch.randn(inner, inner, 3, 3)
        u_out, u_in = torch.linalg.qr(torch.randn(c, inner))[0], torch.linalg.qr(torch.randn(c, inner))[0]
        layer.weight.data.copy_(torch.einsum("rshw,nr,cs->nchw", core, u_out, u_in))
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers).eval()


def test_a_macs_plan_of_scheme_auto_takes_tucker2_where_it_keeps_more_for_fewer_macs():
    model, size = tucker_shaped(), (32, 8, 8)
    target = {"speedup": 10.0}
    by_scheme_2 = lrx.plan.macs.plan_ranks(model, [1, 2], "v2", target, input_size=size)
    assert all(row["retained_energy"] < 0.999 for row in by_scheme_2["layers"]), "scheme 2 loses energy at 10x"
    planned, report = lrx.expand(model, [1, 2], "auto", "auto", target=target, input_size=size)
    plan = report.plan
    assert plan["schemes"] == ["tucker2", "tucker2"] and [row["scheme"] for row in plan["layers"]] == ["tucker2"] * 2
    assert all(row["retained_energy"] > 1 - 1e-9 for row in plan["layers"]), "Tucker-2 of rank >= 2 is exact here"
    assert plan["predicted_speedup"] >= 10.0
    assert count(planned, size)[0] == plan["predicted_macs"], "the plan's MACs are ptflops'"
    assert all(isinstance(planned.get_submodule(name), LowRankTucker2) for name in report.spec["layers"])
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.allclose(planned(x), model(x), atol=1e-4), "lossless by its proxy, so the same outputs"


@pytest.mark.parametrize("target", [{"speedup": 1.5}, {"speedup": 3.0}, {"speedup": 6.0}, {"macs": 0.5}])
def test_scheme_auto_never_plans_macs_worse_than_scheme_2_by_its_proxy(target):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1)).eval()
    lost = {}
    for scheme in ("v2", "auto"):
        plan = lrx.plan.macs.plan_ranks(model, [2, 3, 4], scheme, target, input_size=(3, 12, 12))
        assert plan["predicted_macs"] <= plan["model_macs_before"] * target.get("macs", 1.0)
        lost[scheme] = sum(1 - row["retained_energy"] for row in plan["layers"])
    assert lost["auto"] <= lost["v2"] + 1e-12, lost


def test_with_calibration_data_tucker2s_options_are_ranked_by_their_output_energy():
    model, size = tucker_shaped(c=16, inner=3), (16, 8, 8)
    data = [(torch.randn(8, *size), torch.zeros(8)) for _ in range(3)]
    _, report = lrx.expand(model, [1, 2], "auto", "auto", target={"speedup": 14.0}, fit="data", calibration=data,
                           images=24, iterations=2, input_size=size)
    stats = collect_stats(model, ["0", "2"], data, images=24)
    tucker = [row for row in report.plan["layers"] if row["scheme"] == "tucker2"]
    assert tucker and min(row["retained_energy"] for row in tucker) < 0.99, report.plan["layers"]
    for row in [row for row in tucker if row["retained_energy"] < 0.99]:  # lossy: the two proxies differ
        weight = model.get_submodule(row["name"]).weight.detach()
        assert row["retained_energy"] == tucker2_output_energy(weight, stats[row["name"]], [row["rank"]])[0]
        assert row["retained_energy"] != pytest.approx(float(tucker2_energy(weight)[row["rank"] - 1]), abs=1e-3)
    assert report.plan["proxy"] == "output energy on the calibration images"


class HalfTime:
    """Every expanded layer, of any structure and rank, at half its dense time: the choice is the proxy's alone."""
    batch, input_size, device = 2, (16, 8, 8), torch.device("cpu")

    def key(self):
        return {"device": "fake"}

    def layer(self, conv, input_shape, ranks, scheme="v2"):
        return {"dense": 1.0, **{str(r): 0.5 for r in ranks}}

    def in_model(self, original, names):
        return {"total_ms": 1.0 + len(names), "ms": {n: 1.0 for n in names}}

    def whole(self, original, expanded):
        return {"original_ms": 4.0, "layout": "channels_last", "layouts": {"channels_last": 4.0},
                "expanded_ms": None if expanded is None else 3.0}


def test_a_latency_plan_on_data_weighs_tucker2_by_its_output_energy():
    model, size = tucker_shaped(c=16, inner=3), (16, 8, 8)
    data = [(torch.randn(8, *size), torch.zeros(8)) for _ in range(3)]
    _, report = lrx.expand(model, [1, 2], "auto", "auto", target={"latency": 1.3}, timing=HalfTime(), fit="data",
                           calibration=data, images=24, iterations=2, input_size=size)
    stats = collect_stats(model, ["0", "2"], data, images=24)
    for row in report.plan["table"]:
        weight = model.get_submodule(row["name"]).weight.detach()
        kept = tucker2_output_energy(weight, stats[row["name"]], row["tucker_ranks"])
        assert [row["tucker_loss"][f"t{r}"] for r in row["tucker_ranks"]] == [1.0 - k for k in kept], row["name"]
    _, by_filters = lrx.expand(model, [1, 2], "auto", "auto", target={"latency": 1.3}, timing=HalfTime(),
                               input_size=size)
    energy = tucker2_energy(model[2].weight)
    row = by_filters.plan["table"][1]
    assert [row["tucker_loss"][f"t{r}"] for r in row["tucker_ranks"]] == [1.0 - float(energy[r - 1])
                                                                          for r in row["tucker_ranks"]]


def test_a_tucker2_row_runs_fits_to_data_and_exports_as_plain_convs(tiny_configs, tmp_path):
    runs = tmp_path / "runs"
    row = ["--runs-dir", str(runs), "--set", "decompose.scheme=tucker2", "--set", "decompose.bases=[8, 12, 12]",
           "--set", "decompose.fit=data", "--quiet"]
    result = CliRunner().invoke(app, ["run", str(tiny_configs / "t02.yaml"), *row])
    assert result.exit_code == 0, result.output
    stage = json.loads((runs / "t02" / "metrics.json").read_text())["stages"]["decompose"]
    assert [layer["tucker_ranks"] for layer in stage["report"]] == [[4, 8], [12, 12], [12, 12]], stage["report"]
    assert all(layer["output_error"] < layer["output_error_weights"] for layer in stage["report"]), \
        "the data fit lowers each layer's output error"
    table = CliRunner().invoke(app, ["table", str(runs)])
    assert "|t8,t12,t12|" in table.output, f"the table marks Tucker-2 ranks: {table.output}"
    out = tmp_path / "t02.ts"
    result = CliRunner().invoke(app, ["export", str(runs / "t02"), "--format", "torchscript", "-o", str(out)])
    assert result.exit_code == 0 and out.exists(), result.output
    loaded = torch.jit.load(str(out))
    assert not any("Tucker" in str(m.original_name) for m in loaded.modules()), "plain convs, no lrx class"


@pytest.mark.parametrize("decompose, key, words", [
    ({"scheme": "tucker2", "layers": [2, 3, 4], "bases": [8, 33, 4]}, "decompose.bases.1", "1..32"),
    ({"scheme": "tucker2", "layers": "auto", "bases": [4, 4]}, "decompose.bases", "selects 4 layers"),
    ({"scheme": "tucker2", "order": "hv"}, "decompose.order", "scheme tucker2"),
])
def test_what_tucker2_cannot_do_is_one_line_exit_2_and_nothing_written(tiny_configs, tmp_path, decompose, key, words):
    runs = tmp_path / "runs"
    path = tiny_configs / "bad.yaml"
    path.write_text(yaml.safe_dump({"extends": "base.yaml", "no": 9, "baseline": "t01", "decompose": decompose}))
    result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(runs)])
    line = result.output.strip()
    assert result.exit_code == 2 and "\n" not in line, result.output
    assert "bad.yaml" in line and key in line and words in line, line
    assert not runs.exists(), "nothing written"
