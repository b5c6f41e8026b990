"""Tucker-2 (lrx.factor.tucker, lrx.nn.tucker): exact at full ranks, the HOSVD's error bound, the layer computes
what its dense weight computes, bad ranks refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lrx.factor.tucker import tucker2_hosvd, tucker2_weight
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
