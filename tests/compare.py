"""Comparing results that may differ in the last bits (a batched solve against a one-by-one
one): one home for the tests that need it."""
from __future__ import annotations

import math

ATOL = 1e-4


def assert_close(a, b, where="", atol: float = ATOL) -> None:
    """Equal structure; numbers within ATOL (relative for large ones), the rest equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_close(a[k], b[k], f"{where}/{k}", atol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{k}]", atol)
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), (where, a, b)
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=atol,
                                                                 abs_tol=atol), (where, a, b)
    else:
        assert a == b, (where, a, b)
