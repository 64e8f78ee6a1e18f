"""Issue 13's acceptance tests: 25 CNN families (plain-torch re-implementations of timm 1.0.29's
topologies, tests/families.py), exported with the legacy exporter at opset 17 and analysed by
naflow_onnx.Analyzer. For each: at least 90% of the spatial Conv outputs on the data path
(counted from the ONNX file with onnxruntime alone) get a finite map; the final layer is the
net's last spatial feature map (its captured value equals torch's ``features(x)``); torch /
onnxruntime parity <= 1e-4; every layer but the final one was solved and converged. A few
families are also exported with BatchNorm kept (not folded)."""
from __future__ import annotations

import numpy as np
import pytest

import naflow_onnx as nf
import families

KEEP_BN = ("resnet50d", "densenet121", "mobilenetv3", "dpn68")
CASES = [(name, False) for name in families.FAMILIES] + [(name, True) for name in KEEP_BN]
IDS = [f"{name}{'-bn' if bn else ''}" for name, bn in CASES]
MIN_COVERAGE = 0.9
TOL = 1e-4

_facts: dict = {}
_runs: dict = {}      # case -> (analyzer, image, maps of its one-image analysis)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def facts(name: str, keep_bn: bool, folder) -> dict:
    """families.acceptance() of one case, computed once per session (export, analysis, checks);
    an exception while exporting or analysing is kept and re-raised by every test of the case."""
    key = (name, keep_bn)
    if key not in _facts:
        try:
            model, path = families.export_family(name, folder, keep_bn)
            an = nf.Analyzer(path, parity_tol=TOL, device="cpu")
            size = families.FAMILIES[name].size
            image = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
            flow = an.analyze(image, keep_tensors=True)
            _runs[key] = (an, image, flow.maps)
            _facts[key] = families.acceptance(model, path, an, flow)
        except Exception as exc:  # noqa: BLE001 - re-raised below, per test
            _facts[key] = exc
    res = _facts[key]
    if isinstance(res, Exception):
        raise res
    return res


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_spatial_convs_are_mapped(case, family_dir):
    f = facts(*case, family_dir)
    assert len(f["convs"]) >= 5, f["convs"]
    assert len(f["mapped"]) >= MIN_COVERAGE * len(f["convs"]), \
        f"{len(f['mapped'])}/{len(f['convs'])} spatial conv outputs mapped; missing {f['missing'][:8]}"
    assert not f["nonfinite"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_final_tensor_is_the_last_feature_map(case, family_dir):
    f = facts(*case, family_dir)
    assert f["final_is_last"]
    assert f["final_shape"] == f["features_shape"], (f["final"], f["final_shape"], f["features_shape"])
    assert f["final_error"] <= TOL, (f["final"], f["final_error"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parity_and_convergence(case, family_dir):
    f = facts(*case, family_dir)
    assert f["parity"] <= TOL
    assert f["solved"] > 0 and not f["unsolved"] and not f["unconverged"], \
        (f["solved"], f["unsolved"][:3], f["unconverged"][:3])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batched_solve_equals_the_one_image_solve(case, family_dir):
    """Issue 17: the image solved second in a batch of two gets, at every layer, the BPFM that
    the one-image back-projection gives from the same forward point (the batch's activations
    and Lambda of that image), within 1e-3 of its largest value. (Against a separate one-image
    forward pass the batch may differ more: its convs sum in another order, and a pre-activation
    within round-off of 0 can fall on the other side of a ReLU, as on another BLAS.)"""
    facts(*case, family_dir)
    an, image, _ = _runs[case]
    other = np.random.default_rng(2).integers(0, 256, image.shape, dtype=np.uint8)
    points = an.prepare_many([other, image], layers="all")
    assert points[1].batch is not None and points[1].batch.images == 2
    batched = an.backproject_many(points)[1]
    alone = an.prepare(image, target=points[1].target["index"], layers="all")
    for t in points[1].env:                 # the same forward point as the batch's row
        alone.env[t] = points[1].env[t]
    alone.Lambda = dict(points[1].Lambda)
    single = an.backproject(alone)
    assert batched.error() is None and single.error() is None
    for t in alone.layers:
        a, b = single.bpfm[t], batched.bpfm[t]
        assert float((a - b).abs().max()) <= 1e-3 * (float(a.abs().max()) or 1.0), t
    assert batched.solver_summary()["all_converged"]


def test_verdict_names_each_failure():
    """families.verdict (used by bench/families.py to say what fails) on hand-made facts."""
    good = {"convs": list("abcdefghij"), "mapped": list("abcdefghi"), "missing": ["j"], "final": "z",
            "final_is_last": True, "final_shape": [1, 8, 2, 2], "features_shape": [1, 8, 2, 2],
            "final_error": 1e-6, "parity": 1e-6, "solved": 9, "unsolved": [], "unconverged": [],
            "nonfinite": []}
    assert families.verdict(good) == []
    bad = dict(good, mapped=list("abcdefgh"), final_error=None, final_shape=[1, 8, 16, 16], solved=0)
    got = families.verdict(bad)
    assert len(got) == 3 and got[0] == "8/10 spatial convs mapped" and "not features(x)" in got[1]
