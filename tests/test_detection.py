"""Detectors and segmenters (issue 16): several final tensors, detection and region targets,
letterbox preprocessing; on a generated two-scale detector and on nudenet's YOLOv8n."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from naflow_onnx.errors import TargetError
from naflow_onnx.flow import Analyzer
from naflow_onnx.targets import (DetectionOptions, DetectionTarget, SegmentationOptions,
                                 SegmentationTarget, default_task)

C = 3


class TwoScale(torch.nn.Module):
    """A backbone, a top-down neck (Resize + Concat) and one head per scale reading P3 / P4;
    output [1, 4+C, N] = cat(box, sigmoid(class logits)), like Ultralytics' Detect."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        conv = lambda i, o, s=1: torch.nn.Conv2d(i, o, 3, s, 1)  # noqa: E731
        self.stem, self.down = conv(3, 8, 2), conv(8, 12, 2)
        self.fuse = conv(20, 8)
        self.head3, self.head4 = torch.nn.Conv2d(8, 4 + C, 1), torch.nn.Conv2d(12, 4 + C, 1)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        s1 = torch.relu(self.stem(x))
        p4 = torch.relu(self.down(s1))
        up = torch.nn.functional.interpolate(p4, scale_factor=2.0, mode="nearest")
        p3 = torch.relu(self.fuse(torch.cat([s1, up], 1)))
        self.kept = (p3, p4)
        out = torch.cat([self.head3(p3).flatten(2), self.head4(p4).flatten(2)], 2)
        box = out[:, :4] * 4.0 + 16.0
        return torch.cat([box, torch.sigmoid(out[:, 4:])], 1)


@pytest.fixture(scope="module")
def two_scale(tmp_path_factory):
    net = TwoScale().eval()
    path = tmp_path_factory.mktemp("det") / "two_scale.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(path), input_names=["images"],
                      output_names=["output0"], opset_version=13, dynamo=False)
    image = (np.random.RandomState(5).rand(32, 32, 3) * 255).astype(np.uint8)
    return net, path, image


def _torch_logit_and_grads(net, image, column, anchor):
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    out = net(x)
    p3, p4 = net.kept
    p = out[0, column, anchor]
    z = torch.logit(p.double())
    g3, g4 = torch.autograd.grad(z, (p3, p4))
    return float(z), (p3.detach(), g3), (p4.detach(), g4)


def test_two_scale_finals_parity_and_final_maps(two_scale):
    net, path, image = two_scale
    an = Analyzer(str(path), preprocess="none")
    flow = an.analyze(image, objective=DetectionTarget(DetectionOptions(target=1, min_score=0.0)),
                      keep_tensors=True)
    plan = flow.tensors.plan
    assert len(plan.finals) == 2                               # P3 and P4, the heads' inputs
    shapes = sorted(tuple(flow.tensors.env[f].shape) for f in plan.finals)
    assert shapes == [(1, 8, 16, 16), (1, 12, 8, 8)]
    assert flow.parity["max_relative_error"] < 1e-3
    t = flow.target
    assert t["kind"] == "detection" and t["class"] == 1
    z, (a3, g3), (a4, g4) = _torch_logit_and_grads(net, image, 4 + 1, t["anchor"])
    assert t["logit"] == pytest.approx(z, rel=1e-4, abs=1e-5)  # the logit before the Sigmoid
    # the anchor is the highest-scoring of class 1 (read from the torch model)
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    assert t["anchor"] == int(net(x)[0, 5].argmax())
    # at each final tensor BPFM = A: the map is ReLU(sum_d Lambda_d A_d), Lambda from torch
    by_shape = {tuple(flow.tensors.env[f].shape): f for f in plan.finals}
    for a, g in ((a3, g3), (a4, g4)):
        f = by_shape[tuple(a.shape)]
        assert torch.equal(flow.tensors.BPFM[f], flow.tensors.env[f])
        want = torch.relu((a * g).sum(1))[0].numpy()
        np.testing.assert_allclose(flow.maps[f], want, rtol=1e-3, atol=1e-5)
    # every conv before the heads is mapped; the walk reaches the stem through the neck
    assert flow.coverage["ratio"] == 1.0
    assert len(flow.layers) >= 4 and all(np.isfinite(m).all() for m in flow.maps.values())


def test_two_scale_properties(two_scale):
    """METHOD.md §8 on the multi-output walk: Lambda equals torch autograd on the torch model at
    the stem (reached through both scales), abandonment is exact, and the top segment's J (one
    input, both finals) equals autograd's Jacobian of the segment."""
    from naflow_onnx.rules.backproject import segment_function
    from naflow_onnx.rules.linearize import SegmentMap
    from naflow_onnx.rules.solver import dense_jacobian
    net, path, image = two_scale
    an = Analyzer(str(path), preprocess="none")
    flow = an.analyze(image, objective=DetectionTarget(DetectionOptions(target=2, min_score=0.0)),
                      keep_tensors=True)
    T = flow.tensors
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    s1 = torch.relu(net.stem(x))
    s1.retain_grad()
    p4 = torch.relu(net.down(s1))
    p3 = torch.relu(net.fuse(torch.cat([s1, torch.nn.functional.interpolate(p4, scale_factor=2.0)], 1)))
    out = torch.cat([net.head3(p3).flatten(2), net.head4(p4).flatten(2)], 2)
    out[0, 4 + 2, flow.target["anchor"]].backward()
    stem = next(t for t in T.plan.features if tuple(T.env[t].shape) == (1, 8, 16, 16)
                and an.graph.node_of(t).op_type == "Relu")
    np.testing.assert_allclose(T.Lambda[stem].numpy(), s1.grad.numpy(), rtol=1e-4, atol=1e-6)
    for t in set(T.plan.features) - set(T.plan.finals):          # finals: BPFM = A
        b = T.BPFM[t]
        assert bool((b[T.Lambda[t] == 0] == 0).all()), t          # abandonment
    top = T.plan.segments[-1]
    assert set(top.outputs) == set(T.plan.finals) and top.input == stem
    J = SegmentMap(an.graph, T.env, top.nodes, top.input, top.outputs)
    dense = dense_jacobian(J, 2**28)
    f = segment_function(an.graph, T.env, top)
    ref = torch.autograd.functional.jacobian(f, T.env[top.input]).reshape(dense.shape)
    np.testing.assert_allclose(dense.numpy(), ref.double().numpy(), rtol=1e-4, atol=1e-5)


def test_two_scale_selection_and_bad_input(two_scale):
    _, path, image = two_scale
    an = Analyzer(str(path), preprocess="none")
    assert default_task(an.graph.metadata, [1, 4 + C, 320]) == "detect"
    assert default_task({}, [1, 2, 64, 64]) == "segment"
    assert default_task({"task": "detect"}, [1, 1000]) == "detect"
    first = an.prepare(image, objective=DetectionTarget(DetectionOptions(min_score=0.0)))
    second = an.prepare(image, objective=DetectionTarget(DetectionOptions(detection=2, min_score=0.0)))
    assert first.target["score"] >= second.target["score"]
    assert second.target["anchor"] == first.target["next"][0]["anchor"]
    with pytest.raises(TargetError, match="no box of class"):
        an.prepare(image, objective=DetectionTarget(DetectionOptions(target=0, min_score=1.01)))
    with pytest.raises(TargetError, match="overlaps no box"):
        an.prepare(image, objective=DetectionTarget(DetectionOptions(box=(500, 500, 600, 600),
                                                                     min_score=0.0)))
    with pytest.raises(TargetError, match=r"not a segmenter's \[1, C, H, W\]"):
        an.prepare(image, objective=SegmentationTarget(SegmentationOptions()))


class V5Style(torch.nn.Module):
    """YOLOv5's layout: [1, N, 5+C] (anchor-major) with an objectness column, the Sigmoid on
    objectness and classes before the Concat."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, 2, 1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(6, 8, 3, 1, 1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(8, 5 + C, 1)

    def forward(self, x):
        y = self.head(self.body(x)).flatten(2).transpose(1, 2)          # 1 × N × (5+C)
        return torch.cat([y[..., :4] * 4 + 16, torch.sigmoid(y[..., 4:5]),
                          torch.sigmoid(y[..., 5:])], 2)


def _exported(net, path: Path, side: int, seed: int):
    """``net`` exported to ``path`` (legacy exporter, opset 13), an Analyzer on it, a random image."""
    torch.onnx.export(net, torch.zeros(1, 3, side, side), str(path), input_names=["x"],
                      output_names=["out"], opset_version=13, dynamo=False)
    image = (np.random.RandomState(seed).rand(side, side, 3) * 255).astype(np.uint8)
    return Analyzer(str(path), preprocess="none"), image


def test_v5_layout_objectness(tmp_path):
    net = V5Style().eval()
    an, image = _exported(net, tmp_path / "v5.onnx", 32, 2)
    flow = an.analyze(image, objective=DetectionTarget(DetectionOptions(min_score=0.0)))
    t = flow.target
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = net(x)[0].numpy()
    score = out[:, 5:] * out[:, 4:5]                   # objectness × class probability
    anchor, c = np.unravel_index(score.argmax(), score.shape)
    assert t["objectness"] and (t["anchor"], t["class"]) == (anchor, c)
    assert t["score"] == pytest.approx(score[anchor, c], rel=1e-5)
    p = out[anchor, 5 + c]
    assert t["logit"] == pytest.approx(np.log(p / (1 - p)), rel=1e-3, abs=1e-4)
    final = flow.layer(flow.final_layer)             # the tensor the head conv reads
    assert (final.op_type, final.shape) == ("Relu", [1, 8, 16, 16])
    assert flow.coverage["ratio"] == 1.0


class TinySegmenter(torch.nn.Module):
    """Encoder (stride 2), decoder (ConvTranspose), a 1×1 logit conv, Softmax over 2 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.enc = torch.nn.Conv2d(3, 6, 3, 2, 1)
        self.dec = torch.nn.ConvTranspose2d(6, 5, 2, 2)
        self.logits = torch.nn.Conv2d(5, 2, 1)

    def forward(self, x):
        e = torch.relu(self.enc(x))
        d = torch.relu(self.dec(e))
        self.kept = (e, d)
        return torch.softmax(self.logits(d), 1)


def test_generated_segmenter_region_target(tmp_path):
    net = TinySegmenter().eval()
    an, image = _exported(net, tmp_path / "seg.onnx", 24, 4)
    region = (4, 6, 16, 18)                                # x0, y0, x1, y1 in image pixels
    flow = an.analyze(image, objective=SegmentationTarget(SegmentationOptions(target=1, region=region)),
                      keep_tensors=True)
    assert flow.parity["max_relative_error"] < 1e-3
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    net(x)
    e, d = net.kept
    e.retain_grad()
    logits = net.logits(d)
    d.retain_grad()
    y = logits[0, 1, 6:18, 4:16].sum()                     # pixel centres inside the region
    assert flow.target["score"] == pytest.approx(float(y), rel=1e-4)
    assert flow.target["pixels"] == 144
    y.backward()
    final = flow.final_layer                               # the logit conv's input
    assert tuple(flow.tensors.env[final].shape) == tuple(d.shape)
    np.testing.assert_allclose(flow.maps[final], torch.relu((d * d.grad).sum(1))[0].detach().numpy(),
                               rtol=1e-4, atol=1e-6)
    enc = next(t for t in flow.tensors.plan.features if tuple(flow.tensors.env[t].shape) == tuple(e.shape)
               and an.graph.node_of(t).op_type == "Relu")
    np.testing.assert_allclose(flow.tensors.Lambda[enc].numpy(), e.grad.numpy(), rtol=1e-4, atol=1e-6)
    b = flow.tensors.BPFM[enc]
    assert bool((b[flow.tensors.Lambda[enc] == 0] == 0).all())       # abandonment
    # the default class is the one predicted on most pixels, over those pixels
    auto = an.prepare(image, objective=SegmentationTarget(SegmentationOptions()))
    counts = np.bincount(net(x).argmax(1).reshape(-1).numpy(), minlength=2)
    assert auto.target["class"] == int(counts.argmax()) and auto.target["pixels"] == counts.max()
    with pytest.raises(TargetError, match="lies outside the image"):
        an.prepare(image, objective=SegmentationTarget(SegmentationOptions(region=(30, 30, 40, 40))))


def _nudenet() -> Path:
    spec = importlib.util.find_spec("nudenet")
    assert spec is not None, "nudenet==3.4.2 is installed by scripts/setup.sh"
    return Path(spec.submodule_search_locations[0]) / "320n.onnx"


@pytest.fixture(scope="module")
def nudenet_face():
    """nudenet's YOLOv8n on the astronaut, FACE_FEMALE (one analysis, ~4 s, shared)."""
    import skimage.data
    image = skimage.data.astronaut()
    # the default damping: closed SiLU gates in the neck (g(A) ~ 1e-10) are abandoned, not
    # divided by (docs/method.md "Gate floor"); before, the walk diverged here
    an = Analyzer(str(_nudenet()))
    assert an.preprocess.resize == "letterbox" and an.preprocess.size == (320, 320)
    return an.analyze(image, objective=DetectionTarget(DetectionOptions(target="FACE_FEMALE")))


def test_nudenet_face_female_on_astronaut(nudenet_face):
    flow = nudenet_face
    t = flow.target
    assert t["label"] == "FACE_FEMALE" and t["score"] == pytest.approx(0.83, abs=0.02)
    x0, y0, x1, y1 = t["box"]                      # the face, in the 512x512 photo's pixels
    assert 150 < x0 < 200 and 60 < y0 < 110 and 250 < x1 < 300 and 160 < y1 < 200
    assert len(flow.model["final_tensors"]) == 3
    assert flow.coverage["ratio"] == 1.0          # every spatial conv before the head mapped
    assert flow.solver_summary()["all_converged"]
    b = t["box_input"]
    inside_mass = total = 0.0
    for layer in flow.layers:
        if not layer.final:
            continue
        m = np.clip(flow.maps[layer.tensor], 0, None)
        H, W = m.shape
        ys, xs = (np.arange(H) + .5) * 320 / H, (np.arange(W) + .5) * 320 / W
        inside = ((ys >= b[1]) & (ys <= b[3]))[:, None] & ((xs >= b[0]) & (xs <= b[2]))[None]
        inside_mass += float(m[inside].sum()) / H / W
        total += float(m.sum()) / H / W
    assert inside_mass / total > 0.7               # the box is 4 % of the input


def test_nudenet_maps_on_the_original_image(nudenet_face):
    """Letterboxed input: maps and box in the 512x512 photo's frame, the padding cropped."""
    flow = nudenet_face
    lb = flow.letterbox
    assert lb["original_size"] == [512, 512] and lb["offset"] == [0, 0]
    assert flow.image.shape == (320, 320, 3) and flow.picture.shape == (512, 512, 3)
    x0, y0, x1, y1 = flow.target["box"]
    finals = [layer.tensor for layer in flow.layers if layer.final]
    # the final with most mass (a scale can be empty: its map all zero)
    heavy = max(finals, key=lambda f: float(np.clip(flow.maps[f], 0, None).mean()))
    m = flow.resized(heavy)
    assert m.shape == (512, 512) and m.min() == 0.0 and m.max() == 1.0
    r, c = np.unravel_index(np.argmax(m), m.shape)
    assert x0 <= c <= x1 and y0 <= r <= y1             # the map's maximum is in the face box
    assert m[round((y0 + y1) / 2), round((x0 + x1) / 2)] > 0.5   # the box centre is hot
    # the same map in network-input pixels, brought to the photo by hand (scale 0.625, no pad)
    from naflow_onnx.methods import resize
    by_hand = resize(resize(flow.maps[heavy], (320, 320)), (512, 512))
    by_hand = (by_hand - by_hand.min()) / (by_hand.max() - by_hand.min())
    assert np.abs(by_hand - m).max() < 1e-6


def test_letterbox_crops_the_padding(tmp_path):
    """A wide photo letterboxed into a square input: the map and picture drop the grey bands."""
    from naflow_onnx.flow import Flow, Layer
    from naflow_onnx.targets import ImageFrame
    frame = ImageFrame((64, 32), (32, 32), "letterbox").as_dict()   # 64x32 -> 32x16, top 8
    assert frame["scale"] == 0.5 and frame["offset"] == [0, 8]
    view = np.full((32, 32, 3), 114, np.uint8)
    view[8:24] = 200
    raw = np.zeros((32, 32), np.float32)
    raw[:8] = 5.0                                       # mass on the padding only ...
    raw[8:24, 16:] = 1.0                                # ... and on the right half of the photo
    flow = Flow(model={}, input={}, preprocess={}, target={"kind": "detection", "frame": frame},
                method="naflow", layers=[Layer(0, "t", "n", "Conv", [1, 1, 32, 32], 0, True)],
                maps={"t": raw}, image=view, parity={}, timings={}, options={})
    assert flow.picture.shape == (32, 64, 3) and (flow.picture == 200).all()
    m = flow.resized("t")
    assert m.shape == (32, 64)
    assert m[:, :28].max() == 0.0 and m[:, 36:].min() == 1.0   # the padding's 5 is gone


def _rapidocr_det() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    assert spec is not None, "rapidocr-onnxruntime==1.4.4 is installed by scripts/setup.sh"
    return Path(spec.submodule_search_locations[0]) / "models" / "ch_PP-OCRv4_det_infer.onnx"


@pytest.fixture(scope="module")
def text_line():
    from PIL import Image, ImageDraw, ImageFont
    img = Image.new("RGB", (320, 160), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=32)
    draw.text((40, 60), "Hello World", fill="black", font=font)
    return np.asarray(img), draw.textbbox((40, 60), "Hello World", font=font)


def test_dbnet_text_region_on_a_rendered_line(text_line):
    image, (bx0, by0, bx1, by1) = text_line
    an = Analyzer(str(_rapidocr_det()), size=(160, 320))
    assert default_task(an.graph.metadata, [1, 1, 160, 320]) == "segment"
    flow = an.analyze(image, objective=SegmentationTarget(SegmentationOptions()))
    t = flow.target
    assert t["kind"] == "segmentation" and t["class"] == 0 and t["pixels"] > 500
    # the final tensor is the input of the layer that produces the logits (a ConvTranspose)
    final = flow.final_layer
    readers = [n for n in an.graph.nodes if final in n.inputs]
    assert [n.op_type for n in readers] == ["ConvTranspose"]
    assert flow.coverage["ratio"] == 1.0
    m = np.clip(flow.maps[final], 0, None)
    H, W = m.shape
    ys, xs = (np.arange(H) + .5) * 160 / H, (np.arange(W) + .5) * 320 / W
    inside = ((ys >= by0 - 4) & (ys <= by1 + 4))[:, None] & ((xs >= bx0 - 4) & (xs <= bx1 + 4))[None]
    assert inside.mean() < 0.15 and m[inside].sum() / m.sum() > 0.9
    # a region outside the image is refused, naming it
    with pytest.raises(TargetError, match="lies outside the image"):
        an.prepare(image, objective=SegmentationTarget(SegmentationOptions(region="400,10,500,50")))


def test_cli_dense_bad_input_exits_2(two_scale, tmp_path, capsys):
    from PIL import Image
    from naflow_onnx.cli import main
    _, path, image = two_scale
    photo = tmp_path / "in.png"
    Image.fromarray(image).save(photo)
    cases = [(["--task", "detect", "--box", "500,500,600,600", "--min-score", "0"], "overlaps no box"),
             (["--task", "detect", "--target", "0", "--min-score", "1.5"], "no box of class 0"),
             (["--task", "segment"], "is not a segmenter's [1, C, H, W]"),
             (["--task", "detect", "--region", "1,1,5,5"], "--region does not apply")]
    for extra, message in cases:
        out = tmp_path / f"out{len(extra)}{extra[-1]}"
        code = main(["analyze", str(path), str(photo), "--out", str(out), "--preprocess", "none",
                     "--quiet", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
        assert not out.exists()                     # nothing half-written
    out = tmp_path / "ok"
    assert main(["analyze", str(path), str(photo), "--out", str(out), "--preprocess", "none",
                 "--quiet", "--detection", "1", "--min-score", "0"]) == 0
    import json
    doc = json.loads((out / "flow.json").read_text())
    assert doc["target"]["kind"] == "detection" and len(doc["model"]["final_tensors"]) == 2
