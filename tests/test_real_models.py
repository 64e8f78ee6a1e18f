"""End to end on real models: ImageNet MobileNetV2 (exported here from its real checkpoint) and
the deployed open_nsfw ResNet-50 ONNX file (analysed from the file alone)."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from scipy.stats import spearmanr

import naflow_onnx as nf
from naflow_onnx.preprocess import map_box

from conftest import ROOT


def test_mobilenet_predicts_egyptian_cat(mobilenet_flow):
    t = mobilenet_flow.target
    assert t["index"] == 285 and t["label"] == "Egyptian cat"
    assert 0.6 < t["probability"] < 0.9


def test_mobilenet_every_layer_mapped_parity_and_convergence(mobilenet_flow):
    flow = mobilenet_flow
    plan = flow.tensors.plan
    # 52 Conv + 35 Clip + 10 Add outputs: every feature tensor of the network
    assert len(flow.layers) == len(plan.features) == 97
    assert set(flow.maps) == set(plan.features)
    assert flow.parity["max_relative_error"] < 1e-4
    summary = flow.solver_summary()
    assert summary["all_converged"] and summary["max_convergence"] <= 1e-4
    for layer in flow.layers:
        assert layer.final or layer.solver is not None, layer.tensor


def test_mobilenet_final_layer_equals_gradcam(mobilenet_flow):
    final = mobilenet_flow.final_layer
    ours, gradcam = mobilenet_flow.maps[final], mobilenet_flow.compare_maps[final]
    assert np.linalg.norm(ours - gradcam) / np.linalg.norm(gradcam) < 1e-4


def test_mobilenet_abandonment(mobilenet_flow):
    t = mobilenet_flow.tensors
    for name, bpfm in t.BPFM.items():
        if name != mobilenet_flow.final_layer:
            assert torch.all(bpfm[t.Lambda[name] == 0] == 0), name


def test_reference_method_equals_layercam(mobilenet_analyzer, photos):
    """METHOD.md §7: the released code's method is LayerCAM on layers with A >= 0 (ReLU6 outputs)."""
    flow = mobilenet_analyzer.analyze(photos["chelsea"], method="reference", compare="layercam",
                                      keep_tensors=True)
    checked = 0
    for layer in flow.layers:
        if layer.op_type == "Clip":
            assert float(flow.tensors.A[layer.tensor].min()) >= 0
            np.testing.assert_allclose(flow.maps[layer.tensor], flow.compare_maps[layer.tensor],
                                       rtol=1e-5, atol=1e-6 * float(flow.maps[layer.tensor].max()))
            checked += 1
    assert checked == 35


def test_mobilenet_attention_on_the_cup(mobilenet_analyzer, photos):
    """The final-layer map puts most of its mass on the cup of the coffee photo (hand-drawn box)."""
    boxes = json.loads((ROOT / "data" / "photo_boxes.json").read_text())
    coffee = boxes["coffee"]
    flow = mobilenet_analyzer.analyze(photos["coffee"], method="gradxact")
    assert flow.target["index"] in coffee["imagenet_classes"]
    x0, y0, x1, y1 = map_box(coffee["box"], tuple(coffee["size"]), (224, 224))
    heat = flow.resized(flow.final_layer)
    inside = heat[y0:y1, x0:x1].sum() / heat.sum()
    area = (x1 - x0) * (y1 - y0) / 224 ** 2
    assert inside > area + 0.1, (inside, area)


def test_mobilenet_sanity_randomised_classifier_and_last_conv(mobilenet_onnx, mobilenet_flow, photos, workdir):
    """§8.9: randomising the top layers (classifier and the last conv) changes the late maps."""
    model = onnx.load(mobilenet_onnx)
    rng = np.random.default_rng(0)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    targets = set(gemm.input[1:]) | set(last_conv.input[1:])
    for init in model.graph.initializer:
        if init.name in targets:
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(
                (rng.standard_normal(arr.shape) * arr.std()).astype(np.float32), init.name))
    path = workdir / "mobilenet_random_top.onnx"
    onnx.save(model, path)
    late = [layer.tensor for layer in mobilenet_flow.layers][-6:]
    rand = nf.Analyzer(path).analyze(photos["chelsea"], target=285,
                                     layers="|".join(f"^{re.escape(t)}$" for t in late))
    rhos = [spearmanr(mobilenet_flow.maps[t].ravel(), rand.maps[t].ravel())[0] for t in late]
    assert np.nanmean(rhos) < 0.5, rhos


@pytest.fixture(scope="module")
def nsfw(opennsfw_flow):
    return opennsfw_flow


def test_opennsfw_every_layer_mapped_from_the_file_alone(nsfw, opennsfw_path):
    plan = nsfw.tensors.plan
    counts = {}
    for n in onnx.load(opennsfw_path).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    # every Conv, Relu, MaxPool and residual Add output up to the last block is a feature layer
    expected = counts["Conv"] + counts["Relu"] + counts["MaxPool"] + counts["Add"] - 1  # - head bias Add
    assert len(nsfw.layers) == len(plan.features) == expected == 119
    assert nsfw.parity["max_relative_error"] < 1e-4
    assert nsfw.model["input_shape"] == [1, 224, 224, 3]          # NHWC input handled
    assert nsfw.preprocess["channel_order"] == "BGR"


def test_opennsfw_every_residual_segment_solved(nsfw):
    plan = nsfw.tensors.plan
    joint = [s for s in plan.segments if s.joint]
    assert len(joint) == 16
    records = {r["segment"]: r for layer in nsfw.layers if (r := layer.solver)
               and r.get("rule") == "segment"}
    assert set(records) == {s.id for s in joint}
    for rec in records.values():
        assert rec["kind"] == "cgls" and rec["converged"] and rec["convergence"] <= 1e-4
        assert rec["misfit"] is not None and rec["iterations"] > 0


def test_opennsfw_abandonment(nsfw):
    t = nsfw.tensors
    for name, bpfm in t.BPFM.items():
        if name != nsfw.final_layer:
            assert torch.all(bpfm[t.Lambda[name] == 0] == 0), name
