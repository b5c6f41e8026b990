"""Intervals of an accuracy and of a paired difference (lrx.measure.accuracy) against published and exact values."""
import itertools

import numpy as np
import pytest

from lrx.measure.accuracy import (binomial_tail, clopper_pearson, mcnemar_exact, pack, paired_difference, percent,
                                  unpack, wilson)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857-872,
# Table II, method 3 (the Wilson score interval without continuity correction).
@pytest.mark.parametrize("k, n, low, high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                             (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718), (29, 29, 0.8830, 1.0)])
def test_wilson_matches_newcombes_table(k, n, low, high):
    got = wilson(k, n)
    assert got == pytest.approx((low, high), abs=5e-5), f"Wilson {k}/{n}: {got}, published ({low}, {high})"


def test_wilson_contains_the_estimate_and_narrows_with_n():
    for k, n in [(1, 3), (50, 100), (500, 1000), (9990, 10000)]:
        low, high = wilson(k, n)
        assert 0 <= low <= k / n <= high <= 1, f"{k}/{n}: ({low}, {high})"
    assert np.diff(wilson(900, 1000)) < np.diff(wilson(90, 100)), "ten times the images, a narrower interval"


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (0, 0)])
def test_counts_out_of_range_are_refused(k, n):
    with pytest.raises(ValueError):
        wilson(k, n)


def test_binomial_tails_are_exact():
    assert binomial_tail(3, 10, 0.5, upper=False) == pytest.approx(176 / 1024, rel=1e-12), "P(X <= 3), Bin(10, 1/2)"
    assert binomial_tail(3, 10, 0.5, upper=True) == pytest.approx(968 / 1024, rel=1e-12), "P(X >= 3), Bin(10, 1/2)"
    assert binomial_tail(0, 5, 0.2, upper=False) == pytest.approx(0.8**5, rel=1e-12)


def test_clopper_pearson_matches_closed_forms_and_tables():
    for n in (1, 10, 250):
        assert clopper_pearson(0, n)[1] == pytest.approx(1 - 0.025 ** (1 / n), abs=1e-10), "0 of n: upper bound"
        assert clopper_pearson(n, n)[0] == pytest.approx(0.025 ** (1 / n), abs=1e-10), "n of n: lower bound"
    assert clopper_pearson(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6), "5 of 10, the textbook value"


def test_mcnemar_exact_p_values():
    assert mcnemar_exact(1, 8) == 2 * (1 + 9) / 2**9, "twice P(X <= 1) for Bin(9, 1/2)"
    assert mcnemar_exact(8, 1) == mcnemar_exact(1, 8), "symmetric in the two models"
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == 2 / 64


def bits_of(both_right, only_a, only_b, both_wrong):
    a = np.array([1] * both_right + [1] * only_a + [0] * only_b + [0] * both_wrong, dtype=bool)
    b = np.array([1] * both_right + [0] * only_a + [1] * only_b + [0] * both_wrong, dtype=bool)
    return a, b


def test_paired_difference_counts_only_the_images_the_models_disagree_on():
    a, b = bits_of(900, 10, 20, 70)
    d = paired_difference(a, b)
    assert (d.only_a, d.only_b, d.n) == (10, 20, 1000) and d.diff == pytest.approx(0.01), d
    assert d.p == mcnemar_exact(10, 20)
    low, high = clopper_pearson(20, 30)
    assert (d.low, d.high) == pytest.approx((30 * (2 * low - 1) / 1000, 30 * (2 * high - 1) / 1000)), d
    assert d.low < 0 < d.high, f"p = {d.p:.3f} > 0.05: the interval holds 0: {d}"
    flipped = paired_difference(b, a)
    assert (flipped.diff, flipped.low, flipped.high) == pytest.approx((-d.diff, -d.high, -d.low)), "A - B mirrors B - A"


def test_all_disagreements_one_way_has_its_closed_form():
    a, b = bits_of(50, 0, 8, 42)
    d = paired_difference(a, b)
    assert d.high == pytest.approx(8 / 100) and d.low == pytest.approx(8 * (2 * 0.025 ** (1 / 8) - 1) / 100), d


def test_the_interval_excludes_zero_exactly_when_mcnemar_rejects():
    for only_a, only_b in itertools.product(range(0, 25), repeat=2):
        if only_a + only_b == 0:
            continue
        d = paired_difference(*bits_of(100, only_a, only_b, 10))
        assert (d.low > 0 or d.high < 0) == (d.p < 0.05), f"{only_a}/{only_b}: p {d.p}, interval ({d.low}, {d.high})"


def test_identical_models_differ_by_nothing():
    a, b = bits_of(70, 0, 0, 30)
    assert paired_difference(a, b) == (0.0, 0.0, 0.0, 1.0, 0, 0, 100)
    with pytest.raises(ValueError):
        paired_difference(a, b[:-1])


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_pack_round_trips(n):
    bits = np.random.default_rng(n).random(n) < 0.7
    record = pack(bits)
    assert record["n"] == n and record["correct"] == int(bits.sum()) and len(record["bits"]) <= 4 * (n // 8 + 3) / 3 + 4
    assert np.array_equal(unpack(record), bits), "unpack(pack(x)) == x"


@pytest.mark.parametrize("record", [None, {"n": 8, "bits": "@@@@"}, {"n": 9, "bits": "AA=="},
                                    {"n": 8, "correct": 3, "bits": "AA=="}, {"n": -1, "bits": ""}, {"n": 8}])
def test_a_damaged_record_is_refused(record):
    with pytest.raises(ValueError):
        unpack(record)


def test_percent_rounds_as_evaluate_does():
    """A stage that reads acc@1 off the bits and one that counts on the device must agree to the last bit."""
    correct = np.array([True, False, False])
    assert percent(correct) == 100.0 * 1 / 3 == 33.333333333333336, "100 k first, then / n"
    assert percent(np.ones(7, dtype=bool)) == 100.0
