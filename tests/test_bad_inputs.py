"""Hostile models and bad inputs: each answered by one clear line, exit code 2, no traceback and
no partial output (issue: reliability and security)."""
from __future__ import annotations

import os
import re
import select
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import naflow_onnx as nf
from naflow_onnx import testhooks
from naflow_onnx.errors import ImageError, ModelError, NAFlowError, ParityError, PreprocessError

from conftest import ROOT


def cli(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "naflow_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, proc.stderr


def conv_model(x_shape=(1, 3, 8, 8), extra_nodes=(), out="y", out_shape=(1, 4, 1, 1), inits=()):
    w = numpy_helper.from_array(np.ones((4, x_shape[1], 3, 3), np.float32) * 0.1, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), *extra_nodes]
    if not extra_nodes:
        nodes.append(helper.make_node("GlobalAveragePool", ["r"], [out]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))],
                              [w, *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def image(tmp_path):
    from PIL import Image
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)).save(path)
    return path


def assert_refused(code, stderr, needle, out: Path):
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and re.search(needle, stderr), stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_external_data_outside_the_model_folder_is_refused(tmp_path, image):
    model = conv_model()
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("float_data")
    for k, v in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "432")):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    path = tmp_path / "m" / "traversal.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    code, err = cli("analyze", path, image, "--out", out)
    assert_refused(code, err, "points outside the model's folder", out)


def test_external_data_missing(tmp_path, image):
    model = conv_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    out = tmp_path / "out"
    code, err = cli("analyze", path, image, "--out", out)
    assert_refused(code, err, "external data file 'weights.bin'.*missing", out)


def test_model_over_the_size_limit(tmp_path, image):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), path)
    out = tmp_path / "out"
    code, err = cli("analyze", path, image, "--out", out, "--max-model-bytes", "100")
    assert_refused(code, err, "exceeds the size limit of 100 bytes", out)


def test_model_failing_the_checker(tmp_path, image):
    model = conv_model()
    model.graph.node[1].input[0] = "nowhere"            # an input nothing produces
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    code, err = cli("analyze", path, image, "--out", out)
    assert_refused(code, err, "fails onnx.checker", out)


def test_graph_with_a_cycle(tmp_path, image):
    model = conv_model(extra_nodes=[helper.make_node("Add", ["r", "z"], ["a"]),
                                    helper.make_node("Relu", ["a"], ["z"]),
                                    helper.make_node("GlobalAveragePool", ["z"], ["y"])])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    code, err = cli("analyze", path, image, "--out", out)
    assert_refused(code, err, "cycle|topologically sorted|fails onnx.checker", out)


def test_unsupported_attribute(tmp_path, image):
    """Conv with an auto_pad value no rule knows is refused by name (by onnxruntime or by us)."""
    model = conv_model()
    del model.graph.node[0].attribute[:]
    model.graph.node[0].attribute.append(helper.make_attribute("auto_pad", "MIRROR"))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    code, err = cli("analyze", path, image, "--out", out)
    assert_refused(code, err, "auto_pad|MIRROR|Conv", out)


def test_dynamic_spatial_dims_need_a_size(tmp_path, image):
    model = conv_model(x_shape=("n", 3, "h", "w"), out_shape=("n", 4, 1, 1))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    code, err = cli("analyze", path, image, "--out", out)
    assert_refused(code, err, "dynamic spatial dims: give --size", out)
    code, err = cli("analyze", path, image, "--out", out, "--size", "16", "--preprocess", "none")
    assert code == 0, err


def test_nan_produced_by_the_model(tmp_path, image):
    """log of a negative activation -> NaN: refused naming the tensor, not a silent map."""
    neg = numpy_helper.from_array(np.array(-1.0, np.float32), "neg")
    model = conv_model(extra_nodes=[helper.make_node("Mul", ["r", "neg"], ["m"]),
                                    helper.make_node("Log", ["m"], ["l"]),
                                    helper.make_node("Add", ["l", "c"], ["s"]),
                                    helper.make_node("GlobalAveragePool", ["s"], ["y"])],
                       inits=[neg])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    code, err = cli("analyze", path, image, "--out", out, "--preprocess", "none")
    assert_refused(code, err, "NaN/Inf", out)


def test_zero_sized_and_wrong_shaped_images(small_models):
    analyzer = nf.Analyzer(small_models["chain"][1])
    with pytest.raises(ImageError, match="H×W×3"):
        analyzer.analyze(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ImageError, match="H×W×3"):
        analyzer.analyze(np.zeros((4, 4, 7), np.uint8))


def test_wrong_layout_is_refused(small_models):
    with pytest.raises(PreprocessError, match="reads 32 channels"):
        nf.Analyzer(small_models["chain"][1], layout="NHWC")


def test_errors_are_one_line_naflow_errors():
    for cls in (ModelError, ImageError, ParityError, PreprocessError):
        assert issubclass(cls, NAFlowError)


# ------------------------------------------------------------------------------------------------
# hostile images: one line, exit 2, no output


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG declaring ``width`` x ``height`` pixels with no pixel data: what a decompression bomb
    shows before it is decoded (a real one is ~100 kB of zlib zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" +
                     chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) +
                     chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def analyze_in_process(capsys, model, image, out, *extra):
    from naflow_onnx.cli import main
    code = main(["analyze", str(model), str(image), "--out", str(out), "--quiet",
                 *map(str, extra)])
    return code, capsys.readouterr().err


HOSTILE = {
    # 900 million pixels: PIL's own check (at twice its limit) fires first
    "bomb": (lambda d, img: png_header(d / "bomb.png", 30000, 30000), (),
             "bomb.png: the image exceeds the limit of 89478485 pixels (--max-image-pixels)"),
    # 100 million: over PIL's limit (where it only warns), under twice it: our check
    "over-limit": (lambda d, img: png_header(d / "big.png", 10000, 10000), (),
                   "big.png: 10000x10000 = 100000000 pixels exceeds the limit of 89478485"),
    "own-limit": (lambda d, img: img, ("--max-image-pixels", 399),
                  "img.png: 20x20 = 400 pixels exceeds the limit of 399 pixels"),
    # a limit above PIL's is honoured: the bomb's header passes, its (absent) pixels do not
    "raised-limit": (lambda d, img: png_header(d / "bomb.png", 30000, 30000),
                     ("--max-image-pixels", 10**9), "bomb.png: cannot read the image"),
    "truncated": (lambda d, img: written(d / "cut.png", img.read_bytes()[:200]), (),
                  "cut.png: cannot read the image (OSError: image file is truncated"),
    "zero-sized": (lambda d, img: written(d / "zero.png", b""), (),
                   "zero.png: cannot read the image (empty file, 0 bytes)"),
    "folder": (lambda d, img: d, (), ": a folder, not an image file"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_images(small_models, image, tmp_path, capsys, case):
    make, extra, needle = HOSTILE[case]
    out = tmp_path / "out"
    code, err = analyze_in_process(capsys, small_models["chain"][1], make(tmp_path, image), out,
                                   *extra)
    assert_refused(code, err, re.escape(needle), out)


def test_image_at_the_pixel_limit_is_accepted(small_models, image, tmp_path, capsys):
    code, err = analyze_in_process(capsys, small_models["chain"][1], image, tmp_path / "out",
                                   "--max-image-pixels", 400)
    assert code == 0, err
    assert (tmp_path / "out" / "flow.json").is_file()


# ------------------------------------------------------------------------------------------------
# Ctrl-C at a known point (naflow_onnx.testhooks): no sleep, no race with the run


class Paused:
    """`naflow analyze ARGS` in a child process that stops at the N-th arrival at ``point`` and
    waits there until ``resume()`` (or for ever: an interrupt is then certain to come mid-run)."""

    def __init__(self, args, point: str, n: int = 1):
        self.reached_r, reached_w = os.pipe()
        resume_r, self.resume_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "naflow_onnx.cli", "analyze", *map(str, args)], cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT),
                 testhooks.ENV: f"{point}:{n}:{reached_w}:{resume_r}"},
            pass_fds=(reached_w, resume_r), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        os.close(reached_w)
        os.close(resume_r)

    def wait_reached(self, timeout: float = 300) -> None:
        ready, _, _ = select.select([self.reached_r], [], [], timeout)
        line = os.read(self.reached_r, 100) if ready else b""
        if not line:                  # the child ended (or hung) before the point
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"the run never reached the pause point: {err}")

    def finish(self, timeout: float = 300):
        out, err = self.proc.communicate(timeout=timeout)
        os.close(self.reached_r)
        os.close(self.resume_w)
        return self.proc.returncode, err


def test_interrupt_leaves_no_output(small_models, image, tmp_path):
    """SIGINT while the one image is being analysed: exit 130, no folder, no temporary."""
    work = tmp_path / "work"
    work.mkdir()
    run = Paused([small_models["chain"][1], image, "--out", work / "out", "--quiet"],
                 "analyze.image")
    run.wait_reached()
    assert [p.name.split("-")[0] for p in work.iterdir()] == [".out.tmp"]   # mid-run indeed
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list(work.iterdir())


def test_interrupt_keeps_finished_images_for_resume(small_models, image, tmp_path, capsys):
    """SIGINT at the second of two images: the first stays in the marked staging folder and
    --resume reuses it; the finished folder is the same as an uninterrupted run's."""
    work = tmp_path / "work"
    work.mkdir()
    model, out = small_models["chain"][1], work / "out"
    # --batch 1: one by one, so the first image is finished when the second starts
    run = Paused([model, image, image, "--out", out, "--quiet", "--batch", "1"], "analyze.image",
                 n=2)
    run.wait_reached()
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130 and "Traceback" not in err, err
    stage = work / ".out.partial"
    assert sorted(p.name for p in work.iterdir()) == [".out.partial"]
    assert sorted(p.name for p in stage.iterdir()) == [".naflow-output", "000_img"]
    from naflow_onnx.cli import main
    assert main(["analyze", str(model), str(image), str(image), "--out", str(out),
                 "--resume"]) == 0
    assert "1 of 2 images already done" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == [".naflow-output", "000_img", "001_img"]
    assert (out / "000_img" / "maps.npz").read_bytes() == (out / "001_img" / "maps.npz").read_bytes()


def test_weights_are_only_loaded_weights_only():
    """No torch.load without weights_only=True anywhere in the project (no pickle from files)."""
    offenders = []
    for path in list(ROOT.glob("naflow_onnx/**/*.py")) + list(ROOT.glob("exporters/*.py")) + \
            list(ROOT.glob("models/*.py")) + list(ROOT.glob("bench/*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 200]
            if "weights_only=True" not in call.split("\n\n")[0][:300]:
                offenders.append(f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}")
    assert not offenders, offenders
