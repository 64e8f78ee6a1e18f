"""The command line: output contract, bad input (one clear line, exit 2, no partial output),
determinism."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from naflow_onnx.cli import main

from conftest import ROOT


def run_cli(*args, cwd=None):
    """The real entry point in a subprocess: exit code, stdout, stderr."""
    proc = subprocess.run([sys.executable, "-m", "naflow_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, small_image):
    path = tmp_path_factory.mktemp("img") / "object.png"
    Image.fromarray(small_image).save(path)
    return path


def test_analyze_writes_the_output_contract(small_models, image_file, tmp_path):
    out = tmp_path / "flow"
    code = main(["analyze", str(small_models["residual"][1]), str(image_file), "--out", str(out),
                 "--compare", "gradcam", "--quiet"])
    assert code == 0
    data = json.loads((out / "flow.json").read_text())
    for key in ("schema_version", "model", "input", "preprocess", "target", "method", "parity",
                "timings", "layers", "final_layer", "solver_summary", "options"):
        assert key in data, key
    assert len(data["model"]["sha256"]) == 64
    assert data["target"]["kind"] == "class" and isinstance(data["target"]["index"], int)
    maps = np.load(out / "maps.npz")
    assert sorted(maps.files) == sorted(layer["tensor"] for layer in data["layers"])
    for layer in data["layers"]:
        m = maps[layer["tensor"]]
        assert m.dtype == np.float32 and list(m.shape) == layer["shape"][2:]
        assert {"node", "op_type", "segment", "final", "solver"} <= set(layer)
    assert sum(layer["final"] for layer in data["layers"]) == 1
    assert (out / "compare_maps.npz").is_file()
    png = Image.open(out / "flow.png")
    assert png.size[0] > 400 and png.size[1] > 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".flow")]


def test_analyze_several_images_json_summary(small_models, image_file, tmp_path):
    out = tmp_path / "many"
    code, stdout, stderr = run_cli("analyze", small_models["chain"][1], image_file, image_file,
                                   "--out", out, "--json", "--method", "layercam")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert len(summary) == 2
    assert sorted(p.name for p in out.iterdir()) == [".naflow-output", "000_object", "001_object"]
    assert (out / "001_object" / "flow.png").is_file()


def test_analyze_is_deterministic(small_models, image_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["analyze", str(small_models["gated"][1]), str(image_file), "--out", str(out),
                     "--quiet"]) == 0
    assert (a / "maps.npz").read_bytes() == (b / "maps.npz").read_bytes()
    ja, jb = (json.loads((d / "flow.json").read_text()) for d in (a, b))
    ja.pop("timings"), jb.pop("timings")
    assert ja == jb


def test_layers_selection_by_op_type(small_models, image_file, tmp_path):
    out = tmp_path / "relu"
    assert main(["analyze", str(small_models["chain"][1]), str(image_file), "--out", str(out),
                 "--layers", "op:Relu", "--quiet"]) == 0
    data = json.loads((out / "flow.json").read_text())
    assert {layer["op_type"] for layer in data["layers"]} == {"Relu"}


# --- bad input -------------------------------------------------------------------------------

def _model_with(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, small_models):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.onnx").write_text("this is not a model\n" * 20)
    (d / "empty.onnx").write_bytes(b"")
    blob = Path(small_models["chain"][1]).read_bytes()
    (d / "truncated.onnx").write_bytes(blob[: len(blob) // 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32))
    unsupported = _model_with(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Einsum", ["c"], ["e"], equation="nchw->nchw", name="weird_einsum"),
         helper.make_node("GlobalAveragePool", ["e"], ["y"])],
        [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 1, 1])], [w])
    onnx.save(unsupported, d / "unsupported.onnx")
    two_inputs = _model_with([helper.make_node("Add", ["x", "z"], ["y"])],
                             [_vi("x", [1, 3, 8, 8]), _vi("z", [1, 3, 8, 8])], [_vi("y", [1, 3, 8, 8])])
    onnx.save(two_inputs, d / "two_inputs.onnx")
    fc = helper.make_tensor("fc", TensorProto.FLOAT, [3 * 8 * 8, 2], np.ones(384, np.float32))
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, -1])
    mlp = _model_with([helper.make_node("Reshape", ["x", "shape"], ["f"]),
                       helper.make_node("MatMul", ["f", "fc"], ["y"])],
                      [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 2])], [fc, shape])
    onnx.save(mlp, d / "no_features.onnx")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return d


@pytest.mark.parametrize("case,needle", [
    ("text.onnx", "not a valid ONNX file"),
    ("empty.onnx", "empty file"),
    ("truncated.onnx", "not a valid ONNX file"),
    ("missing.onnx", "model file not found"),
    ("unsupported.onnx", "Einsum (node 'weird_einsum')"),
    ("two_inputs.onnx", "2 inputs"),
    ("no_features.onnx", "no 4-D feature tensor"),
])
def test_bad_models(bad_models, image_file, tmp_path, case, needle):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("analyze", bad_models / case, image_file, "--out", out)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["{corrupt}"], "cannot read the image"),
    (["{missing_image}"], "image not found"),
    (["{image}", "--target", "999"], "out of range"),
    (["{image}", "--target", "no such label"], "no labels"),
    (["{image}", "--size", "64"], "does not fit the model input"),
    (["{image}", "--method", "nonsense"], "invalid choice"),
])
def test_bad_inputs(bad_models, small_models, image_file, tmp_path, args, needle):
    out = tmp_path / "out"
    subs = {"corrupt": bad_models / "corrupt.png", "missing_image": tmp_path / "nope.png",
            "image": image_file}
    args = [a.format(**subs) for a in args]
    code, _, stderr = run_cli("analyze", small_models["chain"][1], *args, "--out", out)
    assert code == 2 and needle in stderr, stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_unwritable_output_folder(small_models, image_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run_cli("analyze", small_models["chain"][1], image_file, "--out", blocker / "out")
    assert code == 2 and "cannot write to output folder" in stderr


def test_odd_images_are_converted(small_models, tmp_path):
    """Grayscale, RGBA and 16-bit images are converted (and the conversion is recorded)."""
    rng = np.random.default_rng(1)
    gray = tmp_path / "gray.png"
    Image.fromarray((rng.random((40, 50)) * 255).astype(np.uint8), mode="L").save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray((rng.random((40, 50, 4)) * 255).astype(np.uint8), mode="RGBA").save(rgba)
    deep = tmp_path / "deep.png"
    Image.fromarray((rng.random((40, 50)) * 65535).astype(np.uint16)).save(deep)
    for image in (gray, rgba, deep):
        out = tmp_path / f"out_{image.stem}"
        assert main(["analyze", str(small_models["chain"][1]), str(image), "--out", str(out),
                     "--quiet"]) == 0
        note = json.loads((out / "flow.json").read_text())["input"]["note"]
        assert note, image


def test_export_cli_writes_metadata(tmp_path):
    out = tmp_path / "conv4.onnx"
    code, stdout, stderr = run_cli("export", "--model", "conv4net", "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["parity_relative_error"] < 1e-4
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["naflow.preprocess"])["size"] == [84, 84]
    assert meta["naflow.embedding_output"] == "embedding"


def test_export_factory_with_weights(tmp_path):
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    import smallnets
    weights = tmp_path / "chain.pth"
    torch.save(smallnets.build("chain").state_dict(), weights)
    out = tmp_path / "chain.onnx"
    code, stdout, stderr = run_cli("export", "smallnets:Chain", "--weights", weights, "--input-shape",
                                   "1,3,32,32", "-o", out, "--keep-batchnorm", "--preprocess", "none",
                                   cwd=ROOT / "tests")
    assert code == 0, stderr
    assert "BatchNormalization" in {n.op_type for n in onnx.load(out).graph.node}
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    code, _, stderr = run_cli("export", "smallnets:Chain", "--weights", bad, "-o", tmp_path / "x.onnx",
                              cwd=ROOT / "tests")
    assert code == 2 and "do not match the model" in stderr
    assert not (tmp_path / "x.onnx").exists()


def test_infinite_damping_writes_strict_json(tmp_path):
    """--damp inf (the t -> inf limit of METHOD.md §4) is recorded as "inf", not as the
    non-JSON token Infinity, and the run succeeds."""
    from naflow_onnx.evaluate.synthetic import make_image

    img = tmp_path / "s.png"
    Image.fromarray(make_image(3, 0)[0]).save(img)
    out = tmp_path / "out"
    rc, _, stderr = run_cli("analyze", ROOT / "models" / "synth_plain.onnx", img, "--damp", "inf",
                            "--out", out, "--quiet")
    assert rc == 0, stderr
    text = (out / "flow.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["options"]["damp"] == "inf"
