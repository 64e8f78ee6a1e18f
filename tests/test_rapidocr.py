"""The real deployed rapidocr text-orientation classifier (issue 13): rapidocr-onnxruntime
1.4.4's ``models/ch_ppocr_mobile_v2.0_cls_infer.onnx`` (a Paddle export, opset 11: batch written
as -1, dynamic H and W, weights in Constant nodes, BatchNormalization not folded, hard-swish as
``x * Clip(x + 3, 0, 6) / 6``), used unmodified through the ``naflow analyze`` command line.

The text line is rendered here with Pillow's bundled font (``ImageFont.load_default(size=32)``,
shipped inside the Pillow wheel, so present on any fresh machine): "Hello World", black on white,
centred in 48x192 (the classifier's input size, so no resize or crop happens). onnxruntime alone
classifies it as "0" with probability 0.999999 (p("180") = 9.5e-7) and the same line rotated by
180 degrees as "180" with probability 1 - 1e-8 (checked by the first test, with margin 0.99)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw, ImageFont

import families
from conftest import package_dir
from naflow_onnx.cli import main

SIZE = (48, 192)
LABELS = ["0", "180"]


@pytest.fixture(scope="module")
def classifier():
    path = package_dir("rapidocr_onnxruntime") / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    assert path.is_file(), path
    return path


def render(text: str = "Hello World", font_size: int = 32) -> np.ndarray:
    h, w = SIZE
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((w - (right - left)) // 2 - left, (h - (bottom - top)) // 2 - top), text, fill="black", font=font)
    return np.asarray(img)


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ocr")
    upright = render()
    out = {}
    for name, img in (("upright", upright), ("rotated", np.ascontiguousarray(upright[::-1, ::-1]))):
        out[name] = folder / f"{name}.png"
        Image.fromarray(img).save(out[name])
    return out


def test_onnxruntime_alone_classifies_the_rendered_lines(classifier, lines):
    sess = ort.InferenceSession(str(classifier), providers=["CPUExecutionProvider"])
    for name, want in (("upright", 0), ("rotated", 1)):
        img = np.asarray(Image.open(lines[name]).convert("RGB"), np.float32)
        x = ((img / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        probs = sess.run(None, {sess.get_inputs()[0].name: x})[0][0]
        assert probs[want] > 0.99, (name, probs)


def test_naflow_classifies_and_maps_every_conv(classifier, lines, tmp_path):
    out = tmp_path / "flows"
    code = main(["analyze", str(classifier), str(lines["upright"]), str(lines["rotated"]), "--out", str(out),
                 "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--size", "48x192",
                 "--labels", json.dumps(LABELS), "--quiet"])
    assert code == 0
    convs = families.spatial_conv_outputs(classifier, (1, 3, *SIZE))
    assert len(convs) > 20, convs
    for folder, want in (("000_upright", "0"), ("001_rotated", "180")):
        data = json.loads((out / folder / "flow.json").read_text())
        assert data["target"]["label"] == want, data["target"]
        assert data["target"]["probability"] > 0.99
        maps = np.load(out / folder / "maps.npz")
        missing = sorted(set(convs) - set(maps.files))
        assert not missing, f"{len(missing)}/{len(convs)} spatial convs unmapped: {missing[:5]}"
        assert data["solver_summary"]["all_converged"]
        assert data["parity"]["max_relative_error"] <= 1e-4
