"""Filter-reconstruction math: exact at full rank, optimal where SVD is optimal, shapes as documented."""
import pytest
import torch

from lrx.factor import decomposition as dec
from lrx.base.errors import UserError

# (N, C, dh, dw): square, non-square, 5x5, fewer outputs than kernel taps, 1-D kernels.
SHAPES = [(6, 4, 3, 3), (5, 3, 3, 5), (8, 2, 5, 5), (3, 4, 3, 3), (6, 3, 1, 3), (4, 3, 3, 2)]


def weight(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel_error(w, w_hat) -> float:
    return ((w.double() - w_hat.double()).norm() / w.double().norm()).item()


def v1_error(w, rank, basis, method="svd", **options) -> float:
    return rel_error(w, dec.scheme1_weight(dec.scheme1(w, rank, basis, method, **options)))


def v2_error(w, rank) -> float:
    return rel_error(w, dec.scheme2_weight(dec.scheme2_svd(w, rank)))


@pytest.mark.parametrize("shape", SHAPES)
def test_factor_shapes(shape):
    n, c, dh, dw = shape
    w = weight(shape)
    bases, coeff = dec.scheme1_svd(w, 2, "shared")
    assert bases.shape == (2, dh, dw) and coeff.shape == (n, c, 2), f"shared factors {bases.shape}, {coeff.shape}"
    bases, coeff = dec.scheme1_svd(w, 2, "per-channel")
    assert bases.shape == (c, 2, dh, dw) and coeff.shape == (n, c, 2), f"per-channel factors {bases.shape}, {coeff.shape}"
    v, h = dec.scheme2_svd(w, 2)
    assert v.shape == (2, c, dh, 1) and h.shape == (n, 2, 1, dw), f"scheme 2 factors {v.shape}, {h.shape}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["v1 shared", "v1 per-channel", "v2"])
def test_full_rank_is_exact(shape, form):
    w = weight(shape)
    scheme, _, basis = form.partition(" ")
    top = dec.max_rank(shape, scheme, basis or "shared")
    err = v2_error(w, top) if scheme == "v2" else v1_error(w, top, basis)
    assert err < 1e-12, f"{form} at full rank {top} should reproduce W {shape}, rel error {err:.2e}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["v1 shared", "v1 per-channel", "v2"])
def test_error_strictly_decreases_with_rank_and_matches_spectrum(shape, form):
    w = weight(shape, seed=1)
    scheme, _, basis = form.partition(" ")
    basis = basis or "shared"
    top = dec.max_rank(shape, scheme, basis)
    errors = [v2_error(w, r) if scheme == "v2" else v1_error(w, r, basis) for r in range(1, top + 1)]
    for r in range(1, top):
        assert errors[r] < errors[r - 1], f"{form} {shape}: error at rank {r + 1} ({errors[r]:.6f}) not below rank {r} ({errors[r - 1]:.6f})"
    retained = dec.retained_energy(w, scheme, basis)
    assert retained.shape == (top,), f"retained_energy has one entry per rank, got {tuple(retained.shape)}"
    squared = [e * e for e in errors]
    assert squared == pytest.approx((1 - retained).tolist(), abs=1e-12), f"{form}: error^2 should be 1 - retained energy"


@pytest.mark.parametrize("shape", SHAPES)
def test_per_channel_error_at_most_shared(shape):
    w = weight(shape, seed=2)
    for rank in range(1, dec.max_rank(shape, "v1", "per-channel") + 1):
        shared, per_channel = v1_error(w, rank, "shared"), v1_error(w, rank, "per-channel")
        assert per_channel <= shared + 1e-12, f"{shape} rank {rank}: per-channel {per_channel:.6f} > shared {shared:.6f}"


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (8, 2, 5, 5), (5, 3, 3, 5)])
@pytest.mark.parametrize("basis", ["shared", "per-channel"])
@pytest.mark.parametrize("rank", [1, 2])
def test_alternating_without_penalty_never_worse_than_svd(shape, basis, rank):
    w = weight(shape, seed=3, dtype=torch.float32)
    svd = v1_error(w, rank, basis)
    alternating = v1_error(w, rank, basis, "alternating", lam=0.0, iterations=30)
    assert alternating <= svd + 1e-6, f"alternating lam=0 {alternating:.7f} > SVD {svd:.7f} ({basis}, rank {rank})"


def split_error(w, factors) -> float:
    """Relative error after splitting each basis filter into its rank-1 part (decomposed=True)."""
    v, h = dec.separable_rank1(factors.bases)
    return rel_error(w, dec.scheme1_weight(dec.Scheme1Factors(v[..., :, None] * h[..., None, :], factors.coefficients)))


@pytest.mark.parametrize("basis", ["shared", "per-channel"])
def test_nuclear_norm_makes_bases_separable(basis):
    """The point of the penalty: bases closer to rank 1, so the decomposed layer loses less."""
    w = weight((16, 8, 3, 3), seed=4)
    svd = dec.scheme1_svd(w, 4, basis)
    alt = dec.scheme1_alternating(w, 4, basis, lam=0.1, iterations=60)
    e_svd, e_alt = dec.energy_first_sv(svd.bases).mean().item(), dec.energy_first_sv(alt.bases).mean().item()
    assert e_alt > e_svd + 0.05, f"first-singular-value energy should rise: SVD {e_svd:.3f}, alternating {e_alt:.3f}"
    s_svd, s_alt = split_error(w, svd), split_error(w, alt)
    assert s_alt < s_svd, f"error after the rank-1 split should fall: SVD {s_svd:.4f}, alternating {s_alt:.4f}"


def test_alternating_objective_does_not_rise_with_iterations():
    """At a fixed lam every block step is an exact minimiser: more sweeps never raise the objective."""
    w = weight((12, 6, 3, 3), seed=5)

    def objective(factors, lam):
        bases, coeff = factors  # per-channel: coefficients of channel c are coeff[:, c]
        err = ((w - dec.scheme1_weight(factors)).square().sum((0, 2, 3)) / w.square().sum((0, 2, 3)))
        amplitude = coeff.norm(dim=0) / w.square().sum((0, 2, 3)).sqrt()[:, None]  # (C, M)
        nuclear = torch.linalg.svdvals(bases).sum(-1) / bases.flatten(-2).norm(dim=-1).clamp_min(1e-300)
        return (err.sum() + lam * (amplitude * nuclear).sum()).item()

    values = [objective(dec.scheme1_alternating(w, 3, "per-channel", lam=0.05, lam_start=0.05, iterations=k, tol=0), 0.05)
              for k in (1, 2, 5, 20)]
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:])), f"objective rose between sweeps: {values}"


def test_separable_rank1_and_energy():
    u, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    rank1 = u[:, :, None] * v[:, None, :]
    vert, hor = dec.separable_rank1(rank1)
    assert vert.shape == (5, 3) and hor.shape == (5, 4), f"shapes {vert.shape}, {hor.shape}"
    assert torch.allclose(vert[:, :, None] * hor[:, None, :], rank1, atol=1e-12), "a rank-1 filter splits exactly"
    assert torch.allclose(dec.energy_first_sv(rank1), torch.ones(5, dtype=torch.float64)), "rank-1 energy share is 1"
    identity = torch.eye(3, dtype=torch.float64)
    assert dec.energy_first_sv(identity).item() == pytest.approx(1 / 3), "identity spreads energy evenly"


def test_factors_keep_dtype():
    w = weight((6, 4, 3, 3), dtype=torch.bfloat16)
    for tensors in (dec.scheme1_svd(w, 2), dec.scheme1_alternating(w, 2, iterations=3), dec.scheme2_svd(w, 2)):
        assert all(t.dtype == torch.bfloat16 for t in tensors), "factors are cast back to the weight's dtype"


def test_max_rank_formulas():
    shape = (192, 64, 5, 5)
    assert dec.max_rank(shape, "v1", "shared") == 25, "shared: min(N*C, dh*dw)"
    assert dec.max_rank(shape, "v1", "per-channel") == 25, "per-channel: min(N, dh*dw)"
    assert dec.max_rank((4, 64, 3, 3), "v1", "per-channel") == 4, "per-channel: min(N, dh*dw) with N < 9"
    assert dec.max_rank(shape, "v2") == 320, "scheme 2: min(C*dh, N*dw)"


@pytest.mark.parametrize("call, words", [
    (lambda w: dec.scheme1_svd(w, 0), ["1..9"]),
    (lambda w: dec.scheme1_svd(w, 10), ["10", "1..9"]),
    (lambda w: dec.scheme1_svd(w, 7, "per-channel"), ["7", "1..6"]),
    (lambda w: dec.scheme2_svd(w, 13), ["13", "1..12"]),
    (lambda w: dec.scheme1_svd(w, 2, "perchannel"), ["perchannel", "shared, per-channel"]),
    (lambda w: dec.scheme1(w, 2, method="als"), ["als", "svd, alternating"]),
    (lambda w: dec.scheme1(w, 2, method="svd", lam=0.1), ["svd", "lam"]),
    (lambda w: dec.scheme1(w, 2, method="alternating", lamda=0.1), ["lamda", "lam_growth"]),
    (lambda w: dec.scheme1_alternating(w, 2, lam=-1.0), ["lam", "-1"]),
])
def test_bad_arguments_are_user_errors(call, words):
    w = weight((6, 4, 3, 3))
    with pytest.raises(UserError) as err:
        call(w)
    for word in words:
        assert word in str(err.value), f"message {str(err.value)!r} should mention {word!r}"
