"""The expansion layers and the public API: exact where the math is exact, counts that match ptflops."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import write_yaml
from lrx.factor import decomposition as dec
from lrx.config.settings import load_config
from lrx.base.errors import UserError
from lrx.expansion.model import ExpansionNote, expand
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2
from lrx.nn.surgery import build_expanded, select_layers
from lrx.nn.models import alexnet_cifar10, build_model, conv_layers
from lrx.pipeline.runner import check_against_model
from lrx.nn.inference import optimise
from lrx.pipeline.stages import expand_model

# Conv geometries the layers must reproduce: stride, dilation, padding (1, 2), kernel (3, 5), no bias,
# 'same' with an even kernel (PyTorch pads it asymmetrically), and everything mixed.
GEOMETRIES = {
    "stride2": dict(kernel_size=3, stride=2, padding=1),
    "dilation2": dict(kernel_size=3, dilation=2, padding=2),
    "pad(1,2)": dict(kernel_size=3, padding=(1, 2)),
    "kernel(3,5)": dict(kernel_size=(3, 5), padding=(1, 2)),
    "no-bias": dict(kernel_size=3, padding=1, bias=False),
    "same-even": dict(kernel_size=(2, 4), padding="same"),
    "valid": dict(kernel_size=3, padding="valid"),
    "mixed": dict(kernel_size=(5, 3), stride=(2, 3), padding=(2, 0), dilation=(1, 2), bias=False),
}
FORMS = ["v1 shared", "v1 per-channel", "v2"]


def make_conv(geometry, c=4, n=6, seed=0, dtype=torch.float32) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c, n, **GEOMETRIES[geometry]).to(dtype)


def full_rank_layer(conv: nn.Conv2d, form: str, **kwargs) -> nn.Module:
    scheme, _, basis = form.partition(" ")
    if scheme == "v2":
        return LowRankExpConvV2.from_conv(conv, dec.max_rank(conv, "v2"))
    # Full rank for both bases is min(N, dh*dw) per channel; shared needs min(N*C, dh*dw).
    return LowRankExpConvV1.from_conv(conv, dec.max_rank(conv, "v1", basis), basis=basis, **kwargs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# PyTorch warns that 'same' with an even kernel pads a copy of the input; that is the case under test.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("form", FORMS)
def test_full_rank_reproduces_conv(geometry, form):
    conv = make_conv(geometry)
    layer = full_rank_layer(conv, form)
    x = torch.randn(2, 4, 13, 11)
    y, z = conv(x), layer(x)
    assert z.shape == y.shape, f"{form} {geometry}: output shape {tuple(z.shape)} != conv's {tuple(y.shape)}"
    assert rel(z, y) < 1e-4, f"{form} {geometry}: full-rank output differs from the conv by {rel(z, y):.2e}"


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("form", ["v1 shared", "v1 decomposed", "v1 per-channel decomposed", "v2"])
def test_forward_is_the_conv_of_its_dense_weight(geometry, form):
    """At any rank the layer computes conv(x, dense_weight): stride/padding/dilation are split right."""
    conv = make_conv(geometry, seed=1)
    if form == "v2":
        layer = LowRankExpConvV2.from_conv(conv, 3)
    else:
        layer = LowRankExpConvV1.from_conv(conv, 2, basis="per-channel" if "per-channel" in form else "shared",
                                           decomposed="decomposed" in form)
    x = torch.randn(2, 4, 12, 14)
    expected = F.conv2d(x.double(), layer.dense_weight(), conv.bias.double() if conv.bias is not None else None,
                        conv.stride, conv.padding, conv.dilation)
    assert rel(layer(x), expected) < 1e-5, f"{form} {geometry}: forward differs from conv with its dense weight"


RESNET_CONVS = ["conv1", "layer1.0.conv1", "layer2.0.conv1"]  # 7x7/2 pad 3 no bias; 3x3; 3x3/2


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_model("resnet18")


@pytest.mark.parametrize("name", RESNET_CONVS)
@pytest.mark.parametrize("form", FORMS)
def test_full_rank_on_torchvision_convs(resnet18, name, form):
    conv = resnet18.get_submodule(name)
    layer = full_rank_layer(conv, form)
    x = torch.randn(1, conv.in_channels, 12, 12)
    assert rel(layer(x), conv(x)) < 1e-4, f"{form} on resnet18.{name} ({conv}) is not exact at full rank"


def test_v1_refuses_1x1_convs_it_would_slow_down(resnet18):
    conv = resnet18.get_submodule("layer2.0.downsample.0")  # 1x1, stride 2, no bias: C*M + C*M*N > C*N MACs
    with pytest.raises(UserError, match="more at every rank") as err:
        LowRankExpConvV1.from_conv(conv, 1, name="layer2.0.downsample.0")
    assert "layer2.0.downsample.0" in str(err.value), str(err.value)


def test_decomposed_exact_when_bases_are_separable():
    """decomposed=True loses nothing when the bases are rank 1: W[n, c] = a[n, c] * outer(u_c, v_c)."""
    conv = make_conv("kernel(3,5)", seed=2)
    with torch.no_grad():
        a, u, v = torch.randn(6, 4), torch.randn(4, 3), torch.randn(4, 5)
        conv.weight.copy_(a[:, :, None, None] * (u[:, :, None] * v[:, None, :]))
    layer = LowRankExpConvV1.from_conv(conv, 1, basis="per-channel", decomposed=True)
    x = torch.randn(2, 4, 9, 9)
    assert rel(layer(x), conv(x)) < 1e-4, "decomposed per-channel rank 1 should be exact for W with rank-1 slices"


def refusals():
    cases = {
        "groups": (nn.Conv2d(4, 6, 3, groups=2), "v1", False, "groups=2"),
        "padding_mode": (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), "v1", False, "padding_mode"),
        "1x1 v2": (nn.Conv2d(4, 6, 1), "v2", False, "1x1"),
        "1x1 decomposed": (nn.Conv2d(4, 6, 1), "v1", True, "1x1"),
        "1x1 v1": (nn.Conv2d(4, 6, 1), "v1", False, "1x1 conv"),
        "depthwise": (nn.Conv2d(4, 4, 3, groups=4), "v2", False, "depthwise"),
        "linear": (nn.Linear(4, 6), "v1", False, "nn.Conv2d"),
    }
    odd = nn.Conv2d(4, 6, 3)
    odd.padding = "full"  # not a padding PyTorch's Conv2d accepts; a subclass or a bad edit could leave it
    cases["string padding"] = (odd, "v2", False, "'full'")
    return cases


@pytest.mark.parametrize("case", list(refusals()))
def test_refused_convs_name_the_layer(case):
    conv, scheme, decomposed, words = refusals()[case]
    with pytest.raises(UserError) as err:
        if scheme == "v2":
            LowRankExpConvV2.from_conv(conv, 1, name="block.7")
        else:
            LowRankExpConvV1.from_conv(conv, 1, decomposed=decomposed, name="block.7")
    assert "block.7" in str(err.value), f"{case}: message {str(err.value)!r} should name the layer"
    assert words in str(err.value), f"{case}: message {str(err.value)!r} should say {words!r}"


@pytest.mark.parametrize("form, rank, top", [("v1", 10, 9), ("v2", 13, 12), ("v1", 0, 9)])
def test_rank_out_of_range_names_layer_and_max(form, rank, top):
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(UserError) as err:
        if form == "v2":
            LowRankExpConvV2.from_conv(conv, rank, name="features.3")
        else:
            LowRankExpConvV1.from_conv(conv, rank, name="features.3")
    message = str(err.value)
    assert "features.3" in message and f"1..{top}" in message, f"message {message!r} should name layer and max {top}"


def test_v2_refuses_alternating():
    with pytest.raises(UserError, match="scheme v1 only"):
        LowRankExpConvV2.from_conv(nn.Conv2d(4, 6, 3), 2, method="alternating", name="c")


@pytest.mark.parametrize("form", ["v1", "v1 decomposed", "v2"])
def test_bfloat16_forward(form):
    conv = make_conv("stride2", seed=3)
    x = torch.randn(2, 4, 12, 12)
    layers = {}
    for dtype in (torch.float32, torch.bfloat16):
        c = copy.deepcopy(conv).to(dtype)
        layers[dtype] = LowRankExpConvV2.from_conv(c, 5) if form == "v2" else \
            LowRankExpConvV1.from_conv(c, 3, decomposed="decomposed" in form)
    out = layers[torch.bfloat16](x.bfloat16())
    assert out.dtype == torch.bfloat16, f"{form}: bf16 layer returned {out.dtype}"
    assert all(p.dtype == torch.bfloat16 for p in layers[torch.bfloat16].parameters()), "factors stay bf16"
    assert rel(out.float(), layers[torch.float32](x)) < 0.05, f"{form}: bf16 output far from float32"


def small_stack() -> nn.Sequential:
    """One of each layer form behind a small conv stack."""
    torch.manual_seed(4)
    convs = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, (3, 5), padding=(1, 2), bias=False)]
    return nn.Sequential(
        convs[0], nn.ReLU(),
        LowRankExpConvV1.from_conv(convs[1], 3), nn.ReLU(),
        LowRankExpConvV1.from_conv(convs[1], 2, basis="per-channel", decomposed=True), nn.ReLU(),
        LowRankExpConvV2.from_conv(convs[2], 4),
    )


def test_torch_compile():
    # aot_eager runs dynamo capture (fullgraph: no graph breaks in the layers) and AOTAutograd
    # tracing, which is where module code can fail; inductor's C++ code generation would add
    # ~25 s of cold compilation on 2 cores while testing torch rather than lrx.
    model = small_stack().eval()
    x = torch.randn(2, 3, 10, 10)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert rel(compiled(x), model(x)) < 1e-5, "compiled expansion layers give other outputs"


def test_torch_export():
    model = small_stack().eval()
    x = torch.randn(2, 3, 10, 10)
    program = torch.export.export(model, (x,))
    assert rel(program.module()(x), model(x)) < 1e-6, "exported expansion layers give other outputs"


def test_state_dict_round_trip_through_constructors():
    conv = make_conv("mixed", seed=5)
    for layer, fresh in [
        (LowRankExpConvV1.from_conv(conv, 3, decomposed=True),
         LowRankExpConvV1(4, 6, (5, 3), 3, stride=(2, 3), padding=(2, 0), dilation=(1, 2), bias=False, decomposed=True)),
        (LowRankExpConvV2.from_conv(conv, 4),
         LowRankExpConvV2(4, 6, (5, 3), 4, stride=(2, 3), padding=(2, 0), dilation=(1, 2), bias=False)),
    ]:
        fresh.load_state_dict(layer.state_dict())
        x = torch.randn(1, 4, 11, 11)
        assert torch.equal(fresh(x), layer(x)), f"{type(layer).__name__} rebuilt from shapes gives other outputs"


def test_extra_repr_shows_scheme_and_rank():
    conv = nn.Conv2d(4, 6, 3)
    text = repr(LowRankExpConvV1.from_conv(conv, 3, basis="per-channel"))
    assert "scheme=v1" in text and "rank=3" in text and "basis=per-channel" in text, text
    text = repr(LowRankExpConvV2.from_conv(conv, 5))
    assert "scheme=v2" in text and "rank=5" in text, text


def ptflops_count(model: nn.Module, input_size) -> tuple[int, int]:
    from ptflops import get_model_complexity_info

    # The seed's numbers: the module-hook ("pytorch") backend with functional counting off.
    # ptflops >= 0.7.3 also counts F.relu / F.max_pool2d inside ReLU/MaxPool modules (twice).
    return get_model_complexity_info(model, tuple(input_size), as_strings=False, backend="pytorch",
                                     print_per_layer_stat=False, verbose=False,
                                     backend_specific_config={"count_functional": False})


@pytest.mark.parametrize("geometry", ["stride2", "kernel(3,5)", "mixed", "same-even"])
@pytest.mark.parametrize("form", ["v1", "v1 decomposed", "v2", "v2 hv"])
def test_mac_formulas_match_ptflops(geometry, form):
    conv = make_conv(geometry, seed=6)
    scheme, decomposed, order = form.split()[0], "decomposed" in form, "hv" if "hv" in form else "vh"
    layer = (LowRankExpConvV2.from_conv(conv, 3, order=order) if scheme == "v2"
             else LowRankExpConvV1.from_conv(conv, 3, decomposed=decomposed))
    in_hw = (15, 17)
    out_hw = tuple(conv(torch.zeros(1, 4, *in_hw)).shape[-2:])
    assert ptflops_count(conv, (4, *in_hw))[0] == dec.original_macs(conv, out_hw), f"{geometry}: conv MACs"
    assert ptflops_count(layer, (4, *in_hw))[0] == dec.expanded_macs(conv, scheme, 3, in_hw, out_hw, decomposed, order), \
        f"{form} {geometry}: expanded_macs disagrees with ptflops"


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return alexnet_cifar10()


def test_seed_row1_count(alexnet):
    macs, params = ptflops_count(alexnet, (3, 224, 224))
    assert macs / 1e6 == pytest.approx(698.89, abs=0.005), f"original AlexNet MACs {macs / 1e6:.2f}M"
    assert params / 1e6 == pytest.approx(44.43, abs=0.005), f"original AlexNet params {params / 1e6:.2f}M"


@pytest.mark.parametrize("decomposed, macs_m, params_m", [(False, 446.85, 43.58), (True, 437.59, 43.56)])
def test_seed_expansion_counts(alexnet, decomposed, macs_m, params_m):
    """Seed rows 2 and 6. Row 2's 446.85M is 1.2M above ours: the seed's grouped basis conv kept
    nn.Conv2d's default bias (C*M bias adds per position, 5376 params), which adds nothing useful."""
    expanded, report = expand(alexnet, [2, 3, 4, 5], "v1", [8, 8, 6, 4], basis="shared", method="svd",
                              decomposed=decomposed)
    macs, params = ptflops_count(expanded, (3, 224, 224))
    assert macs / 1e6 == pytest.approx(macs_m, rel=0.005), f"decomposed={decomposed}: {macs / 1e6:.2f}M MACs vs seed {macs_m}M"
    assert params / 1e6 == pytest.approx(params_m, rel=0.005), f"decomposed={decomposed}: {params / 1e6:.3f}M params vs seed {params_m}M"
    original = 698_886_090
    saved = sum(row["macs_before"] - row["macs_after"] for row in report.layers)
    assert macs == original - saved, "the report's per-layer MACs should add up to ptflops' total"


def test_expand_report_and_input_untouched(alexnet):
    before = {k: v.clone() for k, v in alexnet.state_dict().items()}
    structure = repr(alexnet)
    expanded, report = expand(alexnet, ["features.3", 3], "v1", [8, 6], basis="per-channel")
    assert repr(alexnet) == structure, "expand changed the input model's structure"
    assert all(torch.equal(before[k], v) for k, v in alexnet.state_dict().items()), "expand changed input weights"
    assert [row["name"] for row in report.layers] == ["features.3", "features.6"], "names and indices mix"
    assert [row["index"] for row in report.layers] == [2, 3], "1-based indices in the report"
    for row, conv in zip(report.layers, [alexnet.features[3], alexnet.features[6]]):
        retained = dec.retained_energy(conv.weight, "v1", "per-channel")[row["rank"] - 1].item()
        assert row["rel_error"] == pytest.approx((1 - retained) ** 0.5, abs=1e-5), f"{row['name']}: SVD error"
        assert row["mac_ratio"] == pytest.approx(row["macs_before"] / row["macs_after"]), "mac_ratio = before/after"
        assert len(row["energy_first_sv"]) == row["rank"], "one energy share per basis filter"
        assert row["shape"] == list(conv.weight.shape) and row["max_rank"] == dec.max_rank(conv, "v1", "per-channel")
    assert isinstance(expanded.features[3], LowRankExpConvV1) and isinstance(alexnet.features[3], nn.Conv2d)


def tiny_net() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, (3, 5), stride=2, padding=(1, 2)),
                         nn.ReLU(), nn.Conv2d(12, 8, 3, dilation=2, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


@pytest.mark.parametrize("build, layers, options", [
    (alexnet_cifar10, [2, 5], dict(scheme="v1", ranks=[8, 6], decomposed=True)),
    (tiny_net, [2, "4"], dict(scheme="v1", ranks=[4, 3], basis="per-channel", method="alternating", iterations=3)),
    (tiny_net, [2, 3], dict(scheme="v2", ranks=[7, 20])),
    (tiny_net, [2, 3], dict(scheme="v2", ranks=[7, 20], order="hv")),
    (tiny_net, [2, 3], dict(scheme="v2", ranks=[7, 20], order="auto")),
])
def test_state_dict_round_trip_through_build_expanded(build, layers, options):
    model = build()
    expanded, report = expand(model, layers, input_size=(3, 64, 64), **options)
    state = expanded.state_dict()
    rebuilt = build_expanded(build(), report.spec)
    rebuilt.load_state_dict(state)  # strict: same keys and shapes
    x = torch.randn(2, 3, 64, 64)
    expanded.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(x), expanded(x)), f"{options}: rebuilt model gives other outputs"


def test_expand_passes_the_v2_order_to_every_layer_and_counts_its_macs():
    """tiny_net's conv2 is 3x5 with stride 2: the two orders differ in MACs and in error."""
    model = tiny_net()
    (_, vh), (_, hv), (_, auto) = (expand(model, [2], "v2", [6], input_size=(3, 32, 32), order=o) for o in ("vh", "hv", "auto"))
    assert [r["order"] for r in (vh.layers[0], hv.layers[0])] == ["vh", "hv"]
    assert hv.spec["orders"] == ["hv"], "the spec records the order, so build_expanded rebuilds it"
    assert (vh.layers[0]["max_rank"], hv.layers[0]["max_rank"]) == (24, 36), \
        "8 -> 12 channels, 3x5 kernel: min(C*dh, N*dw) vertical first, min(C*dw, N*dh) horizontal first"
    assert dec.max_rank((12, 8, 3, 5), "v2", order="auto") == 36, "auto may take either order: the larger maximum"
    assert hv.layers[0]["macs_after"] != vh.layers[0]["macs_after"], "stride 2 and a 3x5 kernel: orders differ"
    assert hv.layers[0]["rel_error"] != pytest.approx(vh.layers[0]["rel_error"]), "the two orders fit W differently"
    cheaper = min((vh, hv), key=lambda r: r.layers[0]["macs_after"])
    assert auto.layers[0]["order"] == cheaper.layers[0]["order"], "auto takes the order with fewer MACs"
    with pytest.raises(UserError, match="scheme v1 takes none"):
        expand(model, [2], "v1", [2], order="hv")


@pytest.mark.parametrize("kwargs, words", [
    (dict(layers=[2, 6]), ["6", "5 conv layers"]),
    (dict(layers=["features.4"]), ["features.4", "features.3"]),
    (dict(layers=[2], ranks=[26]), ["features.3", "26", "1..25"]),
    (dict(layers=[2], scheme="v2", ranks=[0]), ["features.3", "1..320"]),
    (dict(layers=[2, 3], ranks=[8]), ["1 ranks", "2 layers"]),
    (dict(layers=[2, 2], ranks=[8, 8]), ["features.3", "more than once"]),
    (dict(layers=[2], ranks=[8], method="svd", lam=0.1), ["svd", "lam"]),
    (dict(layers=[2], scheme="v3", ranks=[8]), ["v3", "v1, v2"]),
    (dict(layers=[2], ranks={"ranks": [8], "layers": []}), ["plan['ranks']"]),
    (dict(layers=[2], ranks="auto"), ["'auto'", "target={'speedup': X}"]),
])
def test_expand_errors(alexnet, kwargs, words):
    with pytest.raises(UserError) as err:
        expand(alexnet, input_size=(3, 96, 96), **kwargs)
    for word in words:
        assert word in str(err.value), f"message {str(err.value)!r} should mention {word!r}"


def test_expand_refuses_unsupported_layer_by_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(UserError, match=r"layer 2 \('1'\): groups=2"):  # the user's layer 2 is module '1'
        expand(model, [2], "v1", [2], input_size=(3, 16, 16))
    assert len(conv_layers(model)) == 2


# ---------------------------------------------------------------- layer selection: patterns and auto

@pytest.fixture(scope="module")
def mobilenet_v2():
    return build_model("mobilenet_v2")


def test_a_glob_picks_the_convs_of_a_block_and_notes_the_1x1_it_skips(resnet18):
    with pytest.warns(UserWarning, match=r"layer3\.0\.downsample\.0.*skipped.*1x1"):
        expanded, report = expand(resnet18, ["layer3.*"], "v2", 4, input_size=(3, 32, 32))
    names = [row["name"] for row in report.layers]
    assert names == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"], names
    assert len(report.notes) == 1 and "layer 13 ('layer3.0.downsample.0')" in report.notes[0], report.notes
    assert type(expanded.layer3[0].downsample[0]) is nn.Conv2d, "the skipped 1x1 conv stays as it was"


@pytest.mark.parametrize("scheme", ["v1", "v2"])
def test_auto_on_resnet18_takes_every_spatial_conv(resnet18, scheme):
    notes = []
    chosen = select_layers(resnet18, "auto", scheme, notes=notes)
    spatial = [name for name, conv in conv_layers(resnet18) if conv.kernel_size != (1, 1)]
    assert [name for _, name, _ in chosen] == spatial and len(spatial) == 17, [name for _, name, _ in chosen]
    assert [n.split("'")[1] for n in notes] == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)], notes


def test_auto_on_mobilenet_v2_leaves_depthwise_and_pointwise_convs(mobilenet_v2):
    notes = []
    chosen = select_layers(mobilenet_v2, ["auto"], "v2", notes=notes)
    assert [name for _, name, _ in chosen] == ["features.0.0"], "the only full 3x3 conv of mobilenet_v2"
    convs = conv_layers(mobilenet_v2)
    depthwise = [n for n, c in convs if c.groups > 1]
    assert len(notes) == len(convs) - 1 and len(depthwise) == 17, (len(notes), len(convs), len(depthwise))
    assert sum("depthwise" in n for n in notes) == 17 and sum("1x1" in n for n in notes) == len(convs) - 18, notes
    with pytest.raises(UserError, match=r"'features\.1\*' selects no conv that scheme v1 can replace"):
        select_layers(mobilenet_v2, ["features.1*"], "v1")  # features.1, features.10-18: depthwise and 1x1 only


def test_patterns_mix_with_indices_and_names_and_refuse_what_they_cannot_mean(resnet18):
    chosen = select_layers(resnet18, [1, "layer1.0.conv?", "layer4.1.conv2"], "v2")
    assert [i for i, _, _ in chosen] == [1, 2, 3, 20], [(i, n) for i, n, _ in chosen]
    with pytest.raises(UserError, match="more than once"):
        select_layers(resnet18, ["layer1.0.conv1", "layer1.*"], "v2")
    with pytest.raises(UserError, match=r"pattern 'block\*' matches no conv layer; conv layers: conv1"):
        select_layers(resnet18, ["block*"], "v2")
    with pytest.raises(UserError, match=r"'\*downsample\*' selects no conv that scheme v2 can replace.*1x1"):
        select_layers(resnet18, ["*downsample*"], "v2")
    with pytest.raises(UserError, match=r"4 ranks given for 17 layers \(conv1, layer1"):
        expand(resnet18, "auto", "v2", [2, 2, 2, 2], input_size=(3, 32, 32))


def test_an_explicit_rank_that_adds_macs_is_warned_about():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False))  # v2 at rank 12: 12*4*3 + 4*12*3 = 288 > 144 MACs
    with pytest.warns(UserWarning, match=r"rank 12 costs 2\.00x the conv's MACs"):
        _, report = expand(model, [1], "v2", [12], input_size=(4, 8, 8))
    assert report.layers[0]["mac_ratio"] == pytest.approx(0.5), report.layers[0]


# ---------------------------------------------------------------- TorchScript, tracing, torch.export

CAPTURE_FORMS = {
    "v1 shared": dict(scheme="v1"), "v1 per-channel": dict(scheme="v1", basis="per-channel"),
    "v1 decomposed": dict(scheme="v1", decomposed=True), "v2 vh": dict(scheme="v2"),
    "v2 hv": dict(scheme="v2", order="hv"),
}


@pytest.mark.parametrize("form", CAPTURE_FORMS)
def test_every_expansion_layer_scripts_traces_and_exports_after_optimise(form):
    """After lrx.nn.inference.optimise, the hardest case: the layer holds a fast path that no capture may record."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2))
    net, _ = expand(nn.Sequential(conv, nn.ReLU()), [1], ranks=[2], input_size=(4, 12, 12), **CAPTURE_FORMS[form])
    x = torch.randn(2, 4, 12, 12)
    optimise(net.eval(), "cpu", x, path="factored")
    with torch.no_grad():
        want = net(x)
        program = torch.export.export(net, (x,))
        captured = {"script": torch.jit.script(net), "trace": torch.jit.trace(net, x), "export": program.module()}
        for how, module in captured.items():
            assert rel(module(x), want) < 1e-5, f"{form}: {how} gives other outputs"
    graph = str(captured["trace"].inlined_graph) + str(program.graph)
    assert "mkldnn" not in graph, f"{form}: a captured model must hold plain convs, not the process's fast path"


def test_a_config_with_layers_auto_is_checked_against_the_model_and_its_notes_are_said(tiny_configs):
    path = write_yaml(tiny_configs / "auto.yaml", {"extends": "base.yaml", "baseline": "t01",
                                                   "decompose": {"layers": "auto", "scheme": "v2", "bases": [2]}})
    with pytest.raises(UserError, match=r"decompose\.bases: has 1 entries but decompose\.layers selects 4 convs \(0, 3, 6, 8\)"):
        check_against_model(load_config(path))
    cfg = load_config(path, ["decompose.bases=[9,2,2,2]"])  # conv1 (3 -> 16) at rank 9: 513 MACs per position > 432
    assert cfg.decompose.layers == ["auto"], "a lone entry is a one-entry list"
    check_against_model(cfg)
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = expand_model(build_model("tiny_cnn"), cfg, log=said.append)
    assert [row["name"] for row in report.layers] == ["0", "3", "6", "8"], report.layers
    assert said == [f"note: {report.notes[0]}"] and "layer 1 ('0'): rank 9 costs" in said[0], said
    assert not [w for w in caught if issubclass(w.category, ExpansionNote)], "the stage says its notes once, as lines"
