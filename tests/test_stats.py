"""naflow_onnx.stats: the one home of the map correlations, against scipy, and the convention
for a constant map (undefined: nan) with the gate's reading of it."""
from __future__ import annotations

import numpy as np
from scipy import stats as sp

from naflow_onnx import stats
from naflow_onnx.check.checks import pearson as gate_pearson, spearman as gate_spearman
from naflow_onnx.evaluate.metrics import spearman as metric_spearman


def test_match_scipy_with_ties():
    rng = np.random.default_rng(5)
    a = rng.random((9, 9))
    b = a ** 2 + 0.2 * rng.random((9, 9))
    b[:3] = 0.5                                   # ties
    assert abs(stats.pearson(a, b) - sp.pearsonr(a.ravel(), b.ravel())[0]) < 1e-12
    assert abs(stats.spearman(a, b) - sp.spearmanr(a.ravel(), b.ravel())[0]) < 1e-12
    # evaluate and check agree with each other where the correlation is defined
    assert metric_spearman(a, b) == stats.spearman(a, b) == gate_spearman(a, b)
    assert gate_pearson(a, b) == stats.pearson(a, b)


def test_a_constant_map_is_undefined_and_the_gate_reads_it():
    rng = np.random.default_rng(6)
    a, zero, one = rng.random((6, 6)), np.zeros((6, 6)), np.ones((6, 6))
    assert all(np.isnan(f(x, y)) for f in (stats.pearson, stats.spearman, metric_spearman)
               for x, y in ((a, zero), (zero, a), (zero, zero)))
    assert np.isnan(sp.spearmanr(a.ravel(), zero.ravel())[0])          # as scipy
    assert gate_pearson(zero, zero) == 1.0 and gate_pearson(zero, one) == 0.0
    assert gate_pearson(a, zero) == 0.0 and gate_spearman(zero, a) == 0.0
    assert gate_spearman(zero, one) == 1.0          # equal (all-tied) rankings
    # a map with spread far below float64 rounding of its values is constant
    assert stats.is_constant(np.full(10, 1e6) + np.arange(10) * 1e-12)
    assert not stats.is_constant(np.arange(10) * 1e-12)
