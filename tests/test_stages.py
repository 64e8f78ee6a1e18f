"""The analysis stages (``Analyzer.prepare`` -> ``backproject`` -> ``maps`` -> ``flow``) compose to
``Analyzer.analyze``, and the one-call ``analyze`` takes the per-image options the README shows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import naflow_onnx as nf
from naflow_onnx.errors import NAFlowError
from naflow_onnx.flow import BPFMResult, Point


@pytest.fixture(scope="module")
def residual(small_models):
    return nf.Analyzer(small_models["residual"][1], damp=0.1, tol=1e-6)


def test_stages_compose_to_analyze(residual, small_image):
    whole = residual.analyze(small_image, method="naflow", compare="gradcam")
    point = residual.prepare(small_image)
    assert isinstance(point, Point) and point.layers == [layer.tensor for layer in whole.layers]
    assert point.target == whole.target
    bp = residual.backproject(point)
    assert isinstance(bp, BPFMResult) and bp.error() is None and bp.damp == 0.1
    for method, maps in (("naflow", whole.maps), ("gradcam", whole.compare_maps)):
        staged = residual.maps(point, method, bp)
        assert staged.keys() == maps.keys()
        for t in maps:
            np.testing.assert_array_equal(staged[t], maps[t])
    assert bp.solver_summary() == whole.solver_summary()
    assert [layer.as_dict() for layer in residual.layer_records(point, bp.records)] == \
        [layer.as_dict() for layer in whole.layers]


def test_one_point_at_two_dampings(residual, small_image):
    """What evaluate --damps does: one forward point, two back-projections; each equals a whole
    analysis by an analyzer built with that damping."""
    point = residual.prepare(small_image)
    other = nf.Analyzer(residual.graph.path, damp=1.0, tol=1e-6)
    at_1 = residual.maps(point, "naflow", residual.backproject(point, damp=1.0))
    at_01 = residual.maps(point, "naflow", residual.backproject(point))
    reference = other.analyze(small_image)
    for t in reference.maps:
        np.testing.assert_allclose(at_1[t], reference.maps[t], rtol=1e-5, atol=1e-7)
    # the damping matters below the final layer (else the test above proves nothing)
    assert any(not np.allclose(at_1[t], at_01[t], rtol=1e-3) for t in point.layers[:-1])


def test_naflow_maps_need_the_back_projection(residual, small_image):
    point = residual.prepare(small_image)
    with pytest.raises(NAFlowError, match="needs the back-projection"):
        residual.maps(point, "naflow")
    with pytest.raises(NAFlowError, match="unknown method 'nope'"):
        residual.maps(point, "nope")


def test_one_call_analyze_keeps_tensors(small_models, small_image):
    """README: ``naflow_onnx.analyze(..., keep_tensors=True)`` (it used to be refused)."""
    flow = nf.analyze(small_models["chain"][1], small_image, damp=0.1, keep_tensors=True,
                      layers="op:Relu")
    t = flow.tensors
    assert set(flow.maps) <= set(t.BPFM) and set(t.A) == set(t.Lambda) == t.plan.data
    assert all(flow.layer(name).op_type == "Relu" for name in flow.maps if not flow.layer(name).final)
    final = flow.final_layer
    # the maps come from these tensors: Eq. 2 at the final layer, recomputed here
    expected = torch.relu((t.Lambda[final] * t.BPFM[final]).sum(1))[0].float().numpy()
    np.testing.assert_allclose(flow.maps[final], expected, rtol=1e-6)
    assert nf.analyze(small_models["chain"][1], small_image).tensors is None



def test_flow_json_round_trip_is_strict_json(small_models, small_image, tmp_path):
    """Flow.from_json reads back what to_json wrote, through the check's flow cache files; the
    JSON is strict at t = inf (it used to hold the non-JSON token Infinity)."""
    import json
    import math

    from naflow_onnx.check.run import flow_files, flow_from_files

    flow = nf.Analyzer(small_models["gated"][1], damp=math.inf).analyze(small_image, compare="gradcam")
    files = flow_files(flow)

    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")
    doc = json.loads(files["flow.json"], parse_constant=refuse)
    assert doc["options"]["damp"] == "inf"
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    back = flow_from_files(tmp_path)
    assert back.options["damp"] == math.inf and back.to_json() == flow.to_json()
    for a, b in ((back.maps, flow.maps), (back.compare_maps, flow.compare_maps)):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(back.image, flow.image)


def test_streamed_maps_equal_and_free_the_walk(mobilenet_analyzer, photos, monkeypatch):
    """``backproject(stream=...)`` (what ``analyze`` does): the same maps bit for bit, and the walk
    holds the BPFMs of about one segment at a time instead of every layer's (issue 17)."""
    from naflow_onnx.rules import backproject as bp_mod
    held = []

    class Counting(dict):
        def __setitem__(self, k, v):
            super().__setitem__(k, v)
            held.append(len(self))
    real = bp_mod.BackProjection.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        self.bpfm = Counting()
    monkeypatch.setattr(bp_mod.BackProjection, "__init__", init)
    an = mobilenet_analyzer
    point = an.prepare(photos["coffee"])
    full = an.backproject(point)
    most_full, held[:] = max(held), []
    streamed = an.backproject(point, stream=("naflow", "layercam"))
    most_streamed = max(held)
    assert streamed.bpfm == {} and streamed.error() is None
    assert len(point.layers) > 90 and most_full >= len(point.layers)
    assert most_streamed <= 12, most_streamed
    for method in ("naflow", "layercam"):
        a, b = an.maps(point, method, full), an.maps(point, method, streamed)
        assert a.keys() == b.keys()
        for t in a:
            np.testing.assert_array_equal(a[t], b[t])
    with pytest.raises(NAFlowError, match="kept no BPFM"):
        an.maps(point, "naflow", an.backproject(point, stream=("gradcam",)))


def test_streamed_walk_names_non_finite_tensors_per_image():
    from naflow_onnx.flow import _MapTaker
    env = {"a": torch.ones(2, 3, 4, 4), "b": torch.ones(2, 3, 4, 4)}
    taker = _MapTaker(env, env, {"a"}, ("naflow",), 2)
    bad = torch.ones(2, 3, 4, 4)
    bad[1, 2, 0, 0] = float("inf")
    taker({"a": torch.ones(2, 3, 4, 4), "b": bad})
    assert taker.nonfinite == [[], ["b"]]
    assert taker.maps["naflow"]["a"].shape == (2, 4, 4)
    res = BPFMResult({}, {}, 0.01, 0.0, maps={}, nonfinite=["b"])
    with pytest.raises(NAFlowError, match=r"diverged at damping t = 0.01: 1 tensors .*'b'"):
        res.check()


def test_second_damping_reuses_the_points_sigmas(mobilenet_analyzer, photos, monkeypatch):
    """σ of a joint segment depends on the forward point, not on the damping: a second
    back-projection of the same point (evaluate's damping sweep) runs no power iteration, and
    gives what a fresh point gives."""
    from naflow_onnx.rules import solver
    calls = []
    real = solver.spectral_norm
    monkeypatch.setattr(solver, "spectral_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    an = mobilenet_analyzer
    point = an.prepare(photos["astronaut"])
    an.backproject(point, damp=1.0)
    first = len(calls)
    again = an.backproject(point, damp=0.3)
    assert first >= 10 and len(calls) == first      # ten residual blocks, then none
    fresh = an.backproject(an.prepare(photos["astronaut"]), damp=0.3)
    for t in point.layers:
        assert torch.equal(again.bpfm[t], fresh.bpfm[t]), t
