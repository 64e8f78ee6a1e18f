"""Batched analysis (issue 17): several images in one forward/backward and one batched solve give
each image the flow it gets alone (METHOD.md §4 per image: its own damping scale, step lengths
and stopping test), an image that has converged stops costing, and a model that cannot run a
batch falls back to one by one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import naflow_onnx as nf
from naflow_onnx.errors import NAFlowError
from naflow_onnx.rules.affine import ConvMap
from naflow_onnx.rules.solver import cgls, cgls_images
from naflow_onnx.rebuild import rebuild_node

MAP_TOL = 1e-3      # of each map's range: the batched kernels sum in another order, and the
                    # solves stop at a normal-equation residual of 1e-4


def _same_flow(alone: nf.Flow, batched: nf.Flow) -> None:
    assert alone.target["index"] == batched.target["index"]
    assert list(alone.maps) == list(batched.maps)
    for t, m in alone.maps.items():
        span = float(m.max() - m.min()) or 1.0
        assert float(np.abs(batched.maps[t] - m).max()) <= MAP_TOL * span, t
    for a, b in zip(alone.layers, batched.layers):
        if a.solver and a.solver.get("kind") == "cgls":
            # the same steps as alone (a borderline stopping test may move by one)
            assert abs(a.solver["iterations"] - b.solver["iterations"]) <= 1, a.tensor
            assert b.solver["converged"] and b.solver["convergence"] <= 1e-4


def _photos(photos):
    from PIL import Image
    return [np.asarray(Image.open(photos[n]).convert("RGB")) for n in ("chelsea", "coffee", "astronaut")]


def test_batched_mobilenet_equals_one_by_one(mobilenet_analyzer, mobilenet_flow, photos):
    an = mobilenet_analyzer
    images = _photos(photos)
    many = an.analyze_many(images, batch=3)
    assert [f.options["batch"] for f in many] == [3, 3, 3]
    assert len({f.target["index"] for f in many}) == 3        # three different classes
    _same_flow(mobilenet_flow, many[0])
    for image, flow in zip(images[1:], many[1:]):
        _same_flow(an.analyze(image), flow)
    # images converge after different numbers of steps, each its own
    iters = [sum(la.solver.get("iterations", 0) for la in f.layers if la.solver) for f in many]
    assert len(set(iters)) > 1, iters


def test_batch_stages_at_two_dampings(mobilenet_analyzer, photos):
    """prepare_many once, backproject_many at two dampings (what evaluate does): each image's
    BPFM equals its own prepare + backproject."""
    an = mobilenet_analyzer
    images = _photos(photos)[:2]
    points = an.prepare_many(images, target=[281, None], layers="op:Conv")
    assert points[0].target["index"] == 281
    for damp in (1.0, 0.3):
        results = an.backproject_many(points, damp=damp)
        for image, point, res in zip(images, points, results):
            alone = an.prepare(image, target=point.target["index"], layers="op:Conv")
            ref = an.backproject(alone, damp=damp)
            assert res.damp == damp and res.error() is None
            for t in point.layers:
                a, b = ref.bpfm[t], res.bpfm[t]
                assert b.shape == a.shape
                assert float((a - b).abs().max()) <= 1e-3 * float(a.abs().max() + 1e-12), t


def _dynamic_batch(path, out) -> str:
    """The model with its batch dimension (input and outputs) made symbolic."""
    m = onnx.load(str(path))
    for v in list(m.graph.input[:1]) + list(m.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    del m.graph.value_info[:]
    onnx.save(m, str(out))
    return str(out)


@pytest.mark.parametrize("name", ["synth_dense", "synth_inception", "synth_gated"])
def test_batched_branches_and_gates(name, tmp_path):
    """Fan-out, fan-in (dense and inception blocks) and frozen gates, batched."""
    from naflow_onnx.evaluate.synthetic import make_dataset
    path = _dynamic_batch(f"models/{name}.onnx", tmp_path / f"{name}.onnx")
    an = nf.Analyzer(path)
    images = list(make_dataset(3, seed=5)["images"])
    many = an.analyze_many(images, batch=3)
    assert [f.options["batch"] for f in many] == [3, 3, 3]
    for image, flow in zip(images, many):
        _same_flow(an.analyze(image), flow)


def test_batched_opennsfw(opennsfw_path, opennsfw_flow, photos):
    """open_nsfw (another exporter: NHWC, BGR, declared 1×224×224×3) runs batched too."""
    an = nf.Analyzer(opennsfw_path, preprocess="caffe-bgr")
    many = an.analyze_many([photos["chelsea"], photos["coffee"]], batch=2)
    assert [f.options["batch"] for f in many] == [2, 2]
    _same_flow(opennsfw_flow, many[0])
    _same_flow(an.analyze(photos["coffee"]), many[1])


def _unbatchable_model(path, mix: bool) -> str:
    """Conv -> x minus its mean over the batch dimension (``mix``: valid ONNX whose output for
    one image depends on the other images of the batch; else its mean over channels) -> GAP ->
    Flatten, or (not ``mix``) a Reshape to the fixed shape [1, 8] that no batch fits -> Gemm."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[0 if mix else 1], keepdims=1),
             helper.make_node("Sub", ["r", "m"], ["d"]),
             helper.make_node("Conv", ["d", "w2"], ["e"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["e"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]) if mix else
             helper.make_node("Reshape", ["g", "one"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    w2 = numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32), "w2")
    g = helper.make_graph(nodes, "mix",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                          [w, w2, fc, numpy_helper.from_array(np.array([1, 8], np.int64), "one")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)


@pytest.mark.parametrize("mix", [True, False], ids=["mixes-images", "fixed-reshape"])
def test_unbatchable_model_runs_one_by_one(mix, tmp_path):
    """A model whose images do not stay apart in a batch (its scores for the first image differ
    from that image's alone), or that onnxruntime cannot run with a batch: one by one."""
    an = nf.Analyzer(_unbatchable_model(tmp_path / "m.onnx", mix), preprocess="none")
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    many = an.analyze_many(images, batch=2)
    assert [f.options["batch"] for f in many] == [1, 1]
    for image, flow in zip(images, many):
        alone = an.analyze(image)
        for t, m in alone.maps.items():
            assert np.array_equal(flow.maps[t], m)


def test_bad_batch_arguments(mobilenet_analyzer, photos):
    with pytest.raises(NAFlowError, match="2 images but 3 values of target"):
        mobilenet_analyzer.analyze_many([photos["chelsea"]] * 2, target=[1, 2, 3])
    with pytest.raises(NAFlowError, match="batch must be >= 1"):
        mobilenet_analyzer.analyze_many([photos["chelsea"]], batch=0)


def _depthwise_problem(images: int, seed: int = 2):
    torch.manual_seed(seed)
    node = rebuild_node(helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3],
                                         pads=[1, 1, 1, 1], group=5), 0, 17)
    w = torch.randn(5, 1, 3, 3, dtype=torch.float64) * torch.linspace(
        0.2, 3, 5, dtype=torch.float64)[:, None, None, None]
    x0 = torch.randn(images, 5, 8, 8, dtype=torch.float64)
    y0 = node.run([x0, w])[0]
    # image 1's right-hand side is 1000x smaller and smoother: it converges in fewer steps
    delta = torch.randn_like(y0)
    if images > 1:
        delta[1] = 1e-3 * torch.ones_like(delta[1])
    return ConvMap(node, x0, w, y0), delta


class _Counting:
    """Counts the image-rows a map is applied to (the cost of a CGLS run)."""

    def __init__(self, J):
        self.J, self.rows, self.x0 = J, 0, J.x0

    def matvec(self, v):
        self.rows += v.shape[0]
        return self.J.matvec(v)

    def rmatvec(self, u):
        self.rows += u.shape[0]
        return self.J.rmatvec(u)

    def restrict(self, index):
        cut = self.J.restrict(index)
        if cut is None:
            return None
        counting = _Counting(cut)
        counting.rows = 0
        self.children = getattr(self, "children", []) + [counting]
        return counting

    def total(self) -> int:
        return self.rows + sum(c.total() for c in getattr(self, "children", []))


@pytest.mark.parametrize("blocks", [None, (2, 3)])
def test_converged_image_stops_costing(blocks):
    """Two images in one CGLS: each gets exactly the iterate, step count and residual it gets
    alone, and the map is applied to an image only while that image iterates."""
    J, delta = _depthwise_problem(2)
    lam = 0.5
    counted = _Counting(J)
    x, iters, conv, misfit = cgls_images(counted, delta, lam, 1e-8, 500, blocks, images=2)
    for b in range(2):
        Jb = J.restrict(torch.tensor([b]))
        xb, itb, convb, misb = cgls(Jb, delta[b:b + 1], lam, 1e-8, 500, blocks)
        assert abs(int(iters[b]) - itb) <= 1      # round-off may move the last test by one
        assert float((x[b:b + 1] - xb).abs().max()) <= 1e-6 * float(xb.abs().max())
        assert float(conv[b]) <= 1e-8 and convb <= 1e-8
    assert int(iters[0]) != int(iters[1])
    # one Jᵀ·r to start, then one J·p and one Jᵀ·r per iteration, per image while it iterates
    assert counted.total() == 2 + 2 * int(iters.sum())
