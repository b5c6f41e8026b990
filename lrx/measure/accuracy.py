"""How sure an accuracy is: intervals of acc@1 and of a paired difference, from per-image correctness.

An accuracy measured on n test images is a binomial proportion: :func:`wilson` gives its 95% Wilson score
interval (Wilson 1927; Newcombe 1998, "Two-sided confidence intervals for the single proportion", method 3).
Two models evaluated on the same images differ only where one is right and the other wrong;
:func:`paired_difference` takes those images (the discordant pairs): McNemar's exact test (a two-sided
binomial test of the discordant split against 1/2) and an exact interval of the difference, the
Clopper-Pearson interval of the split scaled by the discordant share of the images (conditional on the
images the two models disagree on; it excludes 0 exactly when the test's p < 0.05).

A model's correctness per test image travels in metrics.json as a bit vector (:func:`pack`: base64 of
``numpy.packbits``, 1,250 bytes for 10,000 images), so that every interval can be recomputed later.
Everything here is in fractions of 1; callers scale to percent.
"""
from __future__ import annotations

import base64
import binascii
import math
from typing import NamedTuple

import numpy as np

__all__ = ["Z95", "percent", "wilson", "binomial_tail", "clopper_pearson", "mcnemar_exact", "PairedDifference",
           "paired_difference", "pack", "unpack"]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


def _check_count(k: int, n: int) -> None:
    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer))):
        raise ValueError(f"counts must be integers, got k={k!r}, n={n!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")


def percent(correct) -> float:
    """acc@1 in percent of per-image correctness (bools, (n,)): 100 k / n, rounded as
    :func:`lrx.train.loop.evaluate` rounds it (100 k first, then / n, in float64)."""
    return 100.0 * int(correct.sum()) / len(correct)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``k / n`` (``z``: the normal quantile; 95% by default).

    >>> [round(x, 4) for x in wilson(81, 263)]
    [0.2553, 0.3662]
    """
    _check_count(k, n)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_tail(k: int, n: int, p: float, upper: bool) -> float:
    """P(X <= k) (``upper=False``) or P(X >= k) (``upper=True``) for X ~ Binomial(n, p), summed term by term
    in log space (exact to rounding for any n lrx meets)."""
    if p <= 0.0:
        return 1.0 if (not upper or k <= 0) else 0.0
    if p >= 1.0:
        return 1.0 if (upper or k >= n) else 0.0
    if upper and k <= 0 or not upper and k >= n:
        return 1.0
    if upper and k > n or not upper and k < 0:
        return 0.0
    j = np.arange(1, n + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - j + 1) - np.log(j))])  # log C(n, i), i = 0..n
    i = np.arange(n + 1, dtype=np.float64)
    log_pmf = log_comb + i * math.log(p) + (n - i) * math.log1p(-p)
    log_terms = log_pmf[k:] if upper else log_pmf[: k + 1]
    top = log_terms.max()
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


def _solve(f, target: float) -> float:
    """The p in [0, 1] where the increasing function ``f`` crosses ``target`` (bisection to 1e-12)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if f(mid) < target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of the proportion ``k / n``: the p at which P(X >= k) and
    P(X <= k) are each (1 - confidence) / 2. 0 and 1 are the bounds at k = 0 and k = n."""
    _check_count(k, n)
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else _solve(lambda p: binomial_tail(k, n, p, upper=True), tail)
    high = 1.0 if k == n else _solve(lambda p: -binomial_tail(k, n, p, upper=False), -tail)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test for ``b`` and ``c`` discordant pairs: twice the smaller
    binomial tail of Binomial(b + c, 1/2), at most 1 (1 when there is no discordant pair)."""
    _check_count(min(b, c), max(b + c, 1))
    m = b + c
    if m == 0:
        return 1.0
    smaller = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * smaller / 2**m)


class PairedDifference(NamedTuple):
    """Accuracy of model B minus model A on the same n images, as fractions: ``diff`` = (only_b - only_a) / n,
    its 95% interval [``low``, ``high``], McNemar's exact ``p``; ``only_a`` / ``only_b``: images only A /
    only B classifies correctly."""

    diff: float
    low: float
    high: float
    p: float
    only_a: int
    only_b: int
    n: int


def paired_difference(a, b, confidence: float = 0.95) -> PairedDifference:
    """How much better model B is than model A on the same images, from their per-image correctness.

    Parameters
    ----------
    a, b : bool arrays (n,), image i in the same place in both (:func:`unpack`'s output).

    The interval is the Clopper-Pearson interval of the share of B among the m discordant images,
    mapped to the difference: m (2 theta - 1) / n. It is exact given m and agrees with
    :func:`mcnemar_exact` (it excludes 0 exactly when p < 1 - confidence).
    """
    a, b = np.asarray(a, dtype=bool).ravel(), np.asarray(b, dtype=bool).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired correctness needs two vectors of the same, non-zero length; got {a.size}, {b.size}")
    n = int(a.size)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    m = only_a + only_b
    diff = (only_b - only_a) / n
    if m == 0:
        return PairedDifference(0.0, 0.0, 0.0, 1.0, 0, 0, n)
    low, high = clopper_pearson(only_b, m, confidence)
    return PairedDifference(diff, m * (2 * low - 1) / n, m * (2 * high - 1) / n, mcnemar_exact(only_a, only_b),
                            only_a, only_b, n)


def pack(correct) -> dict:
    """Per-image correctness (bools, (n,)) as a JSON-ready record ``{"n", "correct", "bits"}``: ``bits`` is
    base64 of ``numpy.packbits`` (image 0 in the highest bit of the first byte), ``correct`` the count."""
    bits = np.asarray(correct, dtype=bool).ravel()
    return {"n": int(bits.size), "correct": int(bits.sum()),
            "bits": base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")}


def unpack(record) -> np.ndarray:
    """The bool array (n,) of a :func:`pack` record; ValueError when the record is not one (a wrong length,
    a count that does not match, text that is not base64)."""
    if not isinstance(record, dict) or not isinstance(record.get("bits"), str):
        raise ValueError("not a per-image correctness record ({'n', 'correct', 'bits'})")
    n, count = record.get("n"), record.get("correct")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a count of images, got {n!r}")
    try:
        data = base64.b64decode(record["bits"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bits is not base64") from None
    if len(data) != (n + 7) // 8:
        raise ValueError(f"bits holds {len(data)} bytes; {n} images need {(n + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n).astype(bool)
    if count is not None and count != int(bits.sum()):
        raise ValueError(f"bits holds {int(bits.sum())} correct images, the record says {count!r}")
    return bits
