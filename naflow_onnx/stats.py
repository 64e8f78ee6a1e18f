"""Statistics shared by check and evaluate: rank and linear correlation of two maps.

One convention: a correlation with a constant map is undefined and is ``nan`` (as in
scipy.stats). A caller that must decide on it says how: evaluate averages with ``nanmean``
and counts the undefined cases; check's gates use ``gate_correlation`` (docs/check.md).
Only numpy.
"""
from __future__ import annotations

import numpy as np

# a map whose spread is below this share of its largest magnitude (per element) is constant
_CONSTANT_RTOL = 1e-9


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of the flattened values, ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, np.float64)
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], x.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def _centred(x) -> tuple[np.ndarray, float, bool]:
    x = np.asarray(x, np.float64).ravel()
    d = x - x.mean()
    norm = float(np.sqrt((d * d).sum()))
    scale = max(float(np.abs(x).max(initial=0.0)), 1e-30) * _CONSTANT_RTOL * np.sqrt(x.size)
    return d, norm, norm <= scale


def is_constant(x) -> bool:
    """True when the map has no spread (to float64 rounding of its largest value)."""
    return _centred(x)[2]


def pearson(a, b) -> float:
    """Pearson correlation of two equally sized maps (flattened, float64), in [-1, 1]; ``nan``
    when either map is constant."""
    da, na, const_a = _centred(a)
    db, nb, const_b = _centred(b)
    if const_a or const_b:
        return float("nan")
    return float(np.clip((da * db).sum() / (na * nb), -1.0, 1.0))


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson of average ranks); ``nan`` when either map is constant."""
    return pearson(rankdata(a), rankdata(b))


def gate_correlation(r: float, a, b) -> float:
    """A correlation a pass/fail gate can compare with a threshold: an undefined one (a constant
    map has no direction) counts 1 when both maps are constant and equal, else 0."""
    if not np.isnan(r):
        return r
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return 1.0 if is_constant(a) and is_constant(b) and np.allclose(a, b) else 0.0
