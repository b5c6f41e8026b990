"""Inference paths (lrx.nn.inference): every path computes the default forward, state dicts are untouched, and
scheme 2's horizontal-first order is exact. Timing lives in benchmarks/layer_speed.py, not here."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrx.factor import decomposition as dec
from lrx.nn import inference as speed
from lrx.base.errors import UserError
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2, scheme2_factors
from lrx.expansion.model import expand
from lrx.nn.surgery import build_expanded

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

GEOMETRIES = {
    "3x3": dict(kernel_size=3, padding=1),
    "stride2": dict(kernel_size=3, stride=2, padding=1),
    "dilation2": dict(kernel_size=3, dilation=2, padding=2),
    "kernel(3,5)": dict(kernel_size=(3, 5), padding=(1, 2)),
    "no-bias": dict(kernel_size=3, padding=1, bias=False),
    "same-even": dict(kernel_size=(2, 4), padding="same"),
    "mixed": dict(kernel_size=(5, 3), stride=(2, 3), padding=(2, 0), dilation=(1, 2), bias=False),
}
FORMS = ["v1 shared", "v1 per-channel", "v1 decomposed", "v2", "v2 hv"]


def make_conv(geometry, c=6, n=10, seed=0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c, n, **GEOMETRIES[geometry])


def make_layer(conv: nn.Conv2d, form: str, rank: int = 2) -> nn.Module:
    if form.startswith("v2"):
        return LowRankExpConvV2.from_conv(conv, rank, order="hv" if "hv" in form else "vh")
    return LowRankExpConvV1.from_conv(conv, rank, basis="per-channel" if "per-channel" in form else "shared",
                                      decomposed="decomposed" in form)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def default_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on its default path, whatever path it has chosen."""
    saved, layer._fast = layer._fast, None
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer._fast = saved


# Prepacked oneDNN weights over every geometry; the plain channels_last engine (prepack=False) over three.
CASES = [(g, True) for g in GEOMETRIES] + [(g, False) for g in ("3x3", "same-even", "mixed")]


@pytest.mark.parametrize("geometry,prepack", CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", ["factored", "dense"])
def test_every_path_computes_the_default_forward(geometry, prepack, form, path):
    conv = make_conv(geometry)
    layer = make_layer(conv, form)
    x = torch.randn(3, 6, 13, 12)
    expected = default_forward(layer, x)
    layer.optimise_for("cpu", input_shape=x.shape, path=path, prepack=prepack)
    assert layer.inference_path in ("factored", "dense"), f"{form}: optimise_for chose {layer.inference_path!r}"
    with torch.no_grad():
        got = layer(x)
    assert layer._fast.stages is not None, f"{form} {geometry} {path}: the fast path did not run"
    assert got.shape == expected.shape, f"{form} {geometry} {path}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert rel(got, expected) < 1e-5, f"{form} {geometry} {path} prepack={prepack}: differs by {rel(got, expected):.2e}"
    # Another batch size and input size than the layout hint: the prepacked weights still apply.
    x2 = torch.randn(1, 6, 9, 17)
    with torch.no_grad():
        got2 = layer(x2)
    assert rel(got2, default_forward(layer, x2)) < 1e-5, f"{form} {geometry} {path}: wrong on a shape other than the hint"


@pytest.mark.parametrize("form", FORMS)
def test_path_keeps_channels_last_and_accepts_it(form):
    layer = make_layer(make_conv("3x3"), form).optimise_for("cpu", path="factored")
    x = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last), f"{form}: the CPU path should return NHWC"
    assert rel(y, default_forward(layer, x.contiguous())) < 1e-5, f"{form}: NHWC input changes the result"


@pytest.mark.parametrize("form", ["v1 shared", "v2"])
def test_autograd_uses_the_default_path(form):
    layer = make_layer(make_conv("3x3"), form).optimise_for("cpu", path="factored")
    x = torch.randn(2, 6, 8, 8)
    y = layer(x)  # grad enabled, parameters require grad: the path must not run (it records no graph)
    assert y.grad_fn is not None, f"{form}: output under autograd has no grad_fn"
    assert layer._fast.stages is None, f"{form}: the fast path ran although a graph was wanted"
    y.sum().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None for g in grads), f"{form}: some parameter got no gradient"


@pytest.mark.parametrize("form", FORMS)
def test_path_follows_weight_changes(form):
    """An optimiser step or load_state_dict after optimise_for: the path rebuilds, never runs stale weights."""
    layer = make_layer(make_conv("3x3"), form).optimise_for("cpu", path="auto")
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        before = layer(x)
        for p in layer.parameters():
            p.mul_(1.5).add_(0.1)
        after = layer(x)
    assert rel(after, before) > 1e-3, f"{form}: changing the weights did not change the output"
    assert rel(after, default_forward(layer, x)) < 1e-5, f"{form}: path ran stale weights after an in-place update"
    other = make_layer(make_conv("3x3", seed=5), form)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = layer(x)
    assert rel(loaded, default_forward(other, x)) < 1e-5, f"{form}: path ran stale weights after load_state_dict"


@pytest.mark.parametrize("form", FORMS)
def test_path_adds_nothing_to_the_state_dict_and_survives_copies(form):
    layer = make_layer(make_conv("3x3"), form)
    keys = {k: v.shape for k, v in layer.state_dict().items()}
    layer.optimise_for("cpu")
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        y = layer(x)
    assert {k: v.shape for k, v in layer.state_dict().items()} == keys, f"{form}: optimise_for changed the state_dict"
    twin = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for what, other in (("deepcopy", twin), ("pickle", loaded)):
        assert other.inference_path == layer.inference_path, f"{form}: {what} lost the chosen path"
        with torch.no_grad():
            assert rel(other(x), y) < 1e-6, f"{form}: {what} of an optimised layer computes something else"


def test_default_and_other_devices_keep_the_plain_forward():
    layer = make_layer(make_conv("3x3"), "v2")
    assert layer.optimise_for("cuda").inference_path == "default", "no CUDA path is measured, so none may be chosen"
    assert layer.optimise_for("cpu", path="default").inference_path == "default", "path='default' must clear the path"
    assert "path=" not in repr(layer), "an unoptimised layer's repr should not mention a path"
    layer.optimise_for("cpu", path="dense")
    assert "path=dense" in repr(layer), f"repr should show the chosen path: {layer!r}"
    with pytest.raises(UserError, match="fastest"):
        layer.optimise_for("cpu", path="fastest")


def test_auto_follows_the_mac_rule():
    conv = nn.Conv2d(32, 64, 3, padding=1)
    for layer in (LowRankExpConvV1.from_conv(conv, 9, basis="per-channel"), LowRankExpConvV2.from_conv(conv, 1),
                  LowRankExpConvV2.from_conv(conv, 96)):
        dense, factored = layer._macs_per_position()
        nnpack = speed.nnpack_for(conv)
        want = "dense" if speed.prefer_dense(dense, factored, layer.scheme, nnpack) else "factored"
        assert layer.optimise_for("cpu").inference_path == want, f"{layer!r}: auto did not follow prefer_dense"
    # Scheme 1 at full rank costs more than the conv itself; scheme 2 at rank 1 far less.
    assert LowRankExpConvV1.from_conv(conv, 9, basis="per-channel").optimise_for("cpu").inference_path == "dense"
    assert LowRankExpConvV2.from_conv(conv, 1).optimise_for("cpu").inference_path == "factored"


def test_optimise_a_model_keeps_its_outputs_and_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 16, 5)).eval()
    for scheme, ranks in (("v1", [3, 2]), ("v2", [5, 4])):
        expanded, report = expand(model, [2, 3], scheme, ranks, input_size=(3, 8, 8))
        expanded.eval()
        x = torch.randn(4, 3, 8, 8)
        with torch.no_grad():
            expected = expanded(x)
        saved = {k: v.clone() for k, v in expanded.state_dict().items()}
        speed.optimise(expanded, "cpu", example_input=x)
        paths = speed.describe(expanded)
        assert list(paths) == report.spec["layers"], f"{scheme}: describe lists {list(paths)}"
        assert all(p in ("factored", "dense") for p in paths.values()), f"{scheme}: paths {paths}"
        with torch.no_grad():
            got = expanded(x)
        assert rel(got, expected) < 1e-5, f"{scheme}: optimised model differs by {rel(got, expected):.2e}"
        state = expanded.state_dict()
        assert state.keys() == saved.keys(), f"{scheme}: optimise changed the state_dict keys"
        assert all(torch.equal(state[k], saved[k]) for k in saved), f"{scheme}: optimise changed parameter values"
        rebuilt = build_expanded(model, report.spec).eval()
        rebuilt.load_state_dict(state)
        with torch.no_grad():
            assert rel(rebuilt(x), expected) < 1e-5, f"{scheme}: an optimised model's state_dict does not load back"


# ------------------------------------------------------------------ scheme 2, horizontal first


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_order_hv_at_full_rank_reproduces_the_conv(geometry):
    conv = make_conv(geometry)
    rank = dec.max_rank(conv, "v2", order="hv")
    layer = LowRankExpConvV2.from_conv(conv, rank, order="hv")
    assert layer.order == "hv" and layer.horizontal.in_channels == 6, "hv: the 1 x dw conv must read the input"
    x = torch.randn(2, 6, 13, 11)
    with torch.no_grad():
        y, z = conv(x), layer(x)
    assert z.shape == y.shape, f"hv {geometry}: output shape {tuple(z.shape)} != conv's {tuple(y.shape)}"
    assert rel(z, y) < 1e-4, f"hv {geometry}: full-rank output differs from the conv by {rel(z, y):.2e}"


@pytest.mark.parametrize("geometry", ["stride2", "kernel(3,5)", "mixed"])
def test_order_hv_forward_is_the_conv_of_its_dense_weight(geometry):
    conv = make_conv(geometry, seed=1)
    layer = LowRankExpConvV2.from_conv(conv, 3, order="hv")
    x = torch.randn(2, 6, 12, 14)
    expected = F.conv2d(x.double(), layer.dense_weight(), conv.bias.double() if conv.bias is not None else None,
                        conv.stride, conv.padding, conv.dilation)
    with torch.no_grad():
        assert rel(layer(x), expected) < 1e-5, f"hv {geometry}: forward differs from the conv of dense_weight"


def test_order_hv_is_the_svd_of_the_transposed_matrix():
    """hv at rank K is the best rank-K fit of W as the (C*dw) x (N*dh) matrix: its error is that SVD's tail."""
    torch.manual_seed(3)
    weight = torch.randn(10, 6, 3, 5, dtype=torch.float64)
    for rank in (1, 4, 9):
        vertical, horizontal = scheme2_factors(weight, rank, "hv")
        assert vertical.shape == (10, rank, 3, 1) and horizontal.shape == (rank, 6, 1, 5), "hv factor shapes"
        approx = torch.einsum("kcw,nkh->nchw", horizontal[:, :, 0, :], vertical[:, :, :, 0])
        kept = dec.retained_energy(weight.transpose(2, 3), "v2")[rank - 1]
        err2 = ((weight - approx).norm() / weight.norm()).square()
        assert torch.isclose(err2, 1 - kept, atol=1e-9), f"rank {rank}: hv error {err2:.6f} != SVD tail {1 - kept:.6f}"


def test_order_is_structural_and_round_trips():
    conv = make_conv("kernel(3,5)")
    layer = LowRankExpConvV2.from_conv(conv, 4, order="hv")
    twin = LowRankExpConvV2(6, 10, (3, 5), 4, padding=(1, 2), order="hv")
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        assert rel(twin(x), layer(x)) < 1e-6, "a constructor-built hv layer does not load an hv state_dict"
    assert set(layer.state_dict()) == {"horizontal.weight", "vertical.weight", "vertical.bias"}, \
        f"hv: the 1 x dw conv is 'horizontal', the dh x 1 conv 'vertical', the bias on the second: {set(layer.state_dict())}"
    with pytest.raises(RuntimeError):
        LowRankExpConvV2(6, 10, (3, 5), 4).load_state_dict(layer.state_dict())  # vh cannot hold hv weights


def test_order_auto_picks_fewer_macs_then_smaller_error():
    torch.manual_seed(0)
    strided = nn.Conv2d(8, 8, 3, stride=(1, 2), padding=1)  # vh runs its first conv on twice the columns
    assert LowRankExpConvV2.from_conv(strided, 3, order="auto").order == "hv", "auto must avoid the wider intermediate"
    conv = nn.Conv2d(8, 12, 3, padding=1)
    layer = LowRankExpConvV2.from_conv(conv, 5, order="auto")
    errors = {o: (conv.weight - LowRankExpConvV2.from_conv(conv, 5, order=o).dense_weight().float()).norm().item()
              for o in ("vh", "hv")}
    assert errors[layer.order] <= min(errors.values()) + 1e-6, f"auto chose {layer.order} with errors {errors}"


def test_hv_rank_out_of_range_is_a_user_error():
    conv = make_conv("kernel(3,5)")  # hv max rank min(6*5, 10*3) = 30, vh max min(6*3, 10*5) = 18
    assert LowRankExpConvV2.from_conv(conv, 30, order="hv").rank == 30
    assert LowRankExpConvV2.from_conv(conv, 30, order="auto").order == "hv", "auto must pick the order where the rank fits"
    with pytest.raises(UserError, match="1..30"):
        LowRankExpConvV2.from_conv(conv, 31, order="hv")
    with pytest.raises(UserError, match="1..18"):
        LowRankExpConvV2.from_conv(conv, 19, order="vh")


# ------------------------------------------------------------------ basis filters


def test_basis_filters_of_scheme_2_sum_to_the_first_kernel_slice():
    conv = make_conv("kernel(3,5)")
    for order in ("vh", "hv"):
        layer = LowRankExpConvV2.from_conv(conv, 4, order=order)
        filters = layer.basis_filters()
        assert filters.shape == (4, 3, 5), f"{order}: basis_filters shape {tuple(filters.shape)}"
        assert torch.allclose(filters.double().sum(0), layer.dense_weight()[0, 0], atol=1e-6), \
            f"{order}: the K rank-1 filters must sum to the kernel slice (output 0, input 0)"
        assert all(torch.linalg.matrix_rank(f) <= 1 for f in filters), f"{order}: each filter must be rank 1"


def test_basis_filters_of_scheme_1():
    conv = make_conv("kernel(3,5)", c=6, n=10)
    factors = dec.scheme1_svd(conv.weight.detach(), 3, "shared")
    shared = LowRankExpConvV1.from_conv(conv, 3)
    assert torch.allclose(shared.basis_filters(), factors.bases, atol=1e-6), "shared: the M bases of input channel 0"
    per_channel = LowRankExpConvV1.from_conv(conv, 3, basis="per-channel")
    assert per_channel.basis_filters().shape == (16, 3, 5), "per-channel: the first 16 of C*M = 18 bases"
    split = LowRankExpConvV1.from_conv(conv, 3, decomposed=True).basis_filters()
    assert split.shape == (3, 3, 5) and all(torch.linalg.matrix_rank(f) <= 1 for f in split), \
        "decomposed: M rank-1 filters"


# ------------------------------------------------------------------ whole-model paths: dtype, compile (issue 11)


def small_expanded_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 5)).eval()
    expanded, _ = expand(model, [2], "v2", [6], input_size=(3, 8, 8))
    return model, expanded.eval()


@pytest.mark.parametrize("dtype, autocast, bound", [("bfloat16", True, 3e-2), ("bfloat16", False, 3e-2),
                                                    ("float32", True, 1e-5)])
def test_optimise_with_a_dtype_agrees_with_the_default_forward_within_its_rounding(dtype, autocast, bound):
    _, expanded = small_expanded_model()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = expanded(x)
    net = speed.optimise(copy.deepcopy(expanded), "cpu", x, dtype=dtype, autocast=autocast, compile="eager")
    assert isinstance(net, speed.InferenceModel), "a dtype or compile on CPU wraps the model"
    with torch.no_grad():
        got = net(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape, f"output {got.dtype} {tuple(got.shape)}"
    assert rel(got, expected) < bound, f"{dtype} (autocast {autocast}) differs by {rel(got, expected):.2e} > {bound}"
    assert set(net.state_dict()) == {f"model.{k}" for k in expanded.state_dict()}, \
        "the wrapper adds nothing to the state_dict (no second copy of a compiled module)"
    twin = copy.deepcopy(net)  # lrx.measure.timing copies models to try layouts: a copy runs and agrees
    with torch.no_grad():
        assert rel(twin(x), got) < 1e-6, "a copy of the wrapper computes what the wrapper does"


def test_optimise_on_cpu_float32_is_in_place_and_cuda_graphs_need_cuda():
    _, expanded = small_expanded_model()
    assert speed.optimise(expanded, "cpu") is expanded, "plain CPU float32: the model itself, in place"
    with pytest.raises(UserError, match="CUDA graphs need a CUDA device"):
        speed.optimise(expanded, "cpu", cuda_graph=True)
    with pytest.raises(UserError, match="dtype 'int8' is not one of float32, bfloat16, float16"):
        speed.optimise(expanded, "cpu", dtype="int8")
