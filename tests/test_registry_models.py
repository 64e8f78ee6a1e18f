"""Every registry model through both torch exporters and one full NAFlow analysis.

For each model of ``models.registry``: export with the legacy and the dynamo exporter (the export
checks onnxruntime against torch to 1e-4), check that every ONNX op type has an inverse rule or is
one of the rebuild-only ops, then ONE shared NAFlow analysis of skimage's chelsea photo (legacy
export, ``compare="gradcam"``, ``keep_tensors=True``) feeds many assertions:

* every feature layer is mapped: ``len(flow.layers) == len(plan.features)``, and that equals a
  count made here from the ONNX graph alone (main-path nodes with an N×C×H×W output, H·W > 1);
* torch rebuild vs onnxruntime parity < 1e-4; every solve converged (residual <= tol 1e-4);
* METHOD.md §8.1: at the final feature tensor of a global-average-pool head NAFlow's map equals
  Grad-CAM's (relative L2 < 1e-4); for the flatten heads (AlexNet, VGG16, Conv-4, Conv64F), where
  §8.1 does not apply, it equals gradient × activation (BPFM = A there);
* METHOD.md §8.3: BPFM is exactly 0 wherever Lambda is 0;
* the dynamo export has the same feature layers (Pad nodes aside: its optimiser folds constant
  pads into the convolutions) and the same final-layer map (gradient × activation analysis).

Weights: random (seed 0) and small inputs, except MobileNetV2 and EfficientNet-Lite0 which use
their REAL offline ImageNet weights at 224 and must see a cat on chelsea.

Time (budget about 4 minutes on 2 cores, 1 thread per process): the analyses run in this process,
one model at a time; the dynamo export of the same model and its cross-check analysis run
meanwhile in one background worker process (a plain subprocess, 1 thread), so the two
cores overlap.
Measured (shared 2-core machine): 180 s of CPU in this process (the ResNet-50 family dominates,
10-15 s of NAFlow each at any input size: the solves are bound by the weights, not the pixels)
and 117 s in the worker (dynamo exports 5-15 s each), so about 3-3.5 minutes of wall time.
VGG16 (138M parameters: legacy export ~20 s, load ~20 s, NAFlow at 224 ~45 s, dynamo export
~30 s) runs too: a skipped model would hide a regression.
"""
from __future__ import annotations

import collections
import gc
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import naflow_onnx as nf
from exporters.torch_export import export
from models.registry import MODELS, get_model, package_file
from naflow_onnx.ops import REGISTRY

torch.set_num_threads(1)

NAMES = list(MODELS)
REAL_WEIGHTS = {"mobilenet-v2", "efficientnet-lite0"}
CAT_CLASSES = set(range(281, 286))
# Smallest convenient input per model: 64 gives ResNets a 2×2 last stage; the conv4 family keeps
# its 84; AlexNet/VGG16's adaptive pools export only at 224; real weights are judged at 224.
SIZE = {"alexnet": 224, "vgg16": 224, "conv64f": 84, "conv4net": 84,
        "mobilenet-v2": 224, "efficientnet-lite0": 224}
DEFAULT_SIZE = 64
# every model runs in CI, VGG16 included (about 1.5 min): a skipped model would hide a regression
PARAMS = list(NAMES)
# Heads where the final feature tensor goes through a global average pool into a linear layer.
GAP_HEAD_OPS = {"GlobalAveragePool", "ReduceMean"}
FLATTEN_HEADS = {"alexnet", "vgg16", "conv4net", "conv64f"}
# Node types that produce feature maps on these models' data paths.
FEATURE_OPS = {"Conv", "ConvTranspose", "Relu", "Clip", "LeakyRelu", "PRelu", "MaxPool",
               "AveragePool", "Add", "Sub", "Mul", "BatchNormalization", "Pad", "Concat"}
GATE_SOURCES = {"Sigmoid", "HardSigmoid"}
DYNAMO_TESTS = {"test_export_dynamo", "test_ops_dynamo", "test_dynamo_export_same_feature_layers"}


def chelsea_path() -> Path | None:
    path = package_file("skimage", "data", "chelsea.png")
    return Path(path) if path else None


def _chelsea() -> Path:
    path = chelsea_path()
    if path is None:
        pytest.fail("scikit-image data not installed (scripts/test.sh installs it)")
    return path


def load_model(name: str):
    return get_model(name, weights=None if name in REAL_WEIGHTS else "random")


def export_model(name: str, path: Path, exporter: str):
    model, spec = load_model(name)
    size = SIZE.get(name, DEFAULT_SIZE)
    report = export(model, path, (1, 3, size, size), exporter=exporter, preprocess=spec.preprocess,
                    labels=spec.labels, output_names=list(spec.outputs))
    return report, spec


# ------------------------------------------------------------------------------ graph counting
def main_path_feature_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of the ONNX graph that must carry a map, counted without naflow's graph code.

    Walk back from the graph outputs; at a Mul, do not enter an operand computed from a Sigmoid
    gate through single-data-input ops (SE/CBAM/BAM gates: their branch gets no BPFM). Keep the
    nodes of a feature op type whose output is N×C×H×W with H·W > 1 and that come after the
    first Conv (the image and its preprocessing are not feature maps).
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    consts = {i.name for i in model.graph.initializer}
    producer = {}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts.update(n.output)
        for o in n.output:
            producer[o] = n

    tainted = {}  # tensor -> computed from a gate source through single-data-input ops

    def is_gate(t: str) -> bool:
        if t in tainted:
            return tainted[t]
        n = producer.get(t)
        result = False
        if n is not None:
            data = [i for i in n.input if i and i not in consts]
            result = n.op_type in GATE_SOURCES or (len(data) == 1 and is_gate(data[0]))
        tainted[t] = result
        return result

    seen, stack = set(), [o.name for o in model.graph.output]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        data = [i for i in n.input if i and i not in consts]
        if n.op_type == "Mul" and len(data) == 2:
            data = [i for i in data if not is_gate(i)]
        stack.extend(data)
    order = [n for n in model.graph.node if id(n) in seen]
    first_conv = next(i for i, n in enumerate(order) if n.op_type == "Conv")

    def spatial(t):
        s = shapes.get(t)
        return s is not None and len(s) == 4 and s[2] and s[3] and s[2] * s[3] > 1
    return [n for n in order[first_conv:] if n.op_type in FEATURE_OPS and spatial(n.output[0])]


def op_types(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


# ----------------------------------------------------------------------------------- the cases
def dynamo_job(name: str, path: str) -> dict:
    """Worker process: dynamo export (+ ORT parity) and a gradient × activation analysis of it.
    Returns plain data; an analysis error is returned as text so the export result survives."""
    torch.set_num_threads(1)
    report, _ = export_model(name, Path(path), "dynamo")
    out = {"report": report, "ops": dict(op_types(path)), "flow": None, "flow_error": None}
    try:
        flow = nf.Analyzer(path).analyze(chelsea_path(), method="gradxact")
        out["flow"] = {"parity": flow.parity["max_relative_error"],
                       "feature_layers": flow.model["feature_layers"],
                       "layers": [(layer.op_type, tuple(layer.shape)) for layer in flow.layers],
                       "target": flow.target["index"], "final_map": flow.maps[flow.final_layer]}
    except Exception as exc:  # noqa: BLE001
        import traceback
        out["flow_error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    return out


class Case:
    """Memoised per model: the legacy export and the shared analysis (this process), the dynamo
    export and its cross-check (background worker, started when the model's tests start)."""

    def __init__(self, name: str, workdir: Path):
        self.name, self.workdir = name, workdir
        self.size = SIZE.get(name, DEFAULT_SIZE)
        self.spec = MODELS[name]
        self.future = None
        self._memo = {}

    def _once(self, key, fn):
        if key not in self._memo:
            try:
                self._memo[key] = (True, fn())
            except Exception as exc:  # re-raised for every test that needs it
                self._memo[key] = (False, exc)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    def path(self, exporter: str) -> Path:
        return self.workdir / f"{self.name}-{exporter}.onnx"

    def legacy(self) -> dict:
        def run():
            report, self.spec = export_model(self.name, self.path("legacy"), "legacy")
            return report
        return self._once("legacy", run)

    def flow(self):
        def run():
            analyzer = nf.Analyzer(self.legacy()["path"], damp=0.1, tol=1e-4)
            return analyzer.analyze(_chelsea(), target=None, method="naflow", compare="gradcam",
                                    keep_tensors=True)
        return self._once("flow", run)

    def dynamo(self) -> dict:
        assert self.future is not None, "dynamo job not started"
        return self._once("dynamo", self.future.result)

    def release(self):
        if self.future is not None and not self.future.cancel():
            try:
                self.future.result()
            except Exception:  # noqa: BLE001 - reported by the tests that used it
                pass
        self._memo.clear()
        gc.collect()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


WORKER = r"""
import os, pickle, sys, traceback
sys.path[:0] = sys.argv[1].split(os.pathsep)
import test_registry_models as t
for line in sys.stdin:
    name, path, out = line.rstrip("\n").split("\t")
    try:
        result = ("ok", t.dynamo_job(name, path))
    except BaseException as exc:
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    with open(out + ".tmp", "wb") as fh:
        pickle.dump(result, fh)
    os.replace(out + ".tmp", out)
    print("DONE\t" + out, flush=True)
"""


class DynamoWorker:
    """A second Python process (1 thread) that runs ``dynamo_job`` for one model after another,
    so the dynamo exports overlap the analyses on a second core. A plain subprocess fed job lines
    on stdin (not multiprocessing: that re-imports whatever script started pytest)."""

    def __init__(self, workdir: Path):
        from concurrent.futures import ThreadPoolExecutor
        self.workdir = workdir
        self.proc = None
        self.jobs = ThreadPoolExecutor(max_workers=1)  # one job at a time, in submission order

    def _start(self):
        import subprocess
        import sys
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        paths = os.pathsep.join([str(Path(__file__).resolve().parent), *sys.path])
        self.log = open(self.workdir / "dynamo-worker.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, paths], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def _run(self, name: str, path: str) -> dict:
        import pickle
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        out = str(self.workdir / f"{name}-dynamo.pkl")
        self.proc.stdin.write(f"{name}\t{path}\t{out}\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("DONE\t"):
                break
        else:
            code = self.proc.wait()
            tail = (self.workdir / "dynamo-worker.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"dynamo worker died (exit code {code}) on {name}:\n{tail}")
        with open(out, "rb") as fh:
            status, value = pickle.load(fh)
        os.unlink(out)
        if status != "ok":
            raise RuntimeError(f"dynamo export of {name} failed in the worker: {value}")
        return value

    def submit(self, name: str, path: str):
        return self.jobs.submit(self._run, name, path)

    def close(self):
        self.jobs.shutdown(wait=True, cancel_futures=True)
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.log.close()


@pytest.fixture(scope="module")
def dynamo_pool(workdir):
    worker = DynamoWorker(workdir)
    yield worker
    worker.close()


def _wants_dynamo(session, name: str) -> bool:
    return any(getattr(item, "callspec", None) is not None and item.callspec.params.get("case") == name
               and getattr(item, "originalname", item.name) in DYNAMO_TESTS for item in session.items)


@pytest.fixture(scope="module", params=PARAMS)
def case(request, workdir, dynamo_pool):
    """One model at a time (pytest groups the tests by this module-scoped parameter), released
    before the next: VGG16's kept tensors alone are about 1 GB."""
    c = Case(request.param, workdir)
    if _wants_dynamo(request.session, c.name):
        c.future = dynamo_pool.submit(c.name, str(c.path("dynamo")))
    yield c
    c.release()
    for f in workdir.glob(f"{request.param}-*.onnx"):
        f.unlink()


def _check_ops(ops, label: str) -> None:
    unknown = sorted(op for op in set(ops) if REGISTRY.find(op) is None)
    assert not unknown, f"{label}: ops not in the op registry: {unknown}"


# --------------------------------------------------------------- legacy export, shared analysis
def test_export_legacy(case):
    rep = case.legacy()
    assert rep["parity_relative_error"] < 1e-4
    assert case.spec.untrained == (case.name not in REAL_WEIGHTS)


def test_ops_legacy(case):
    _check_ops(op_types(case.legacy()["path"]), f"{case.name} (legacy)")


def test_every_feature_layer_mapped(case):
    flow = case.flow()
    plan = flow.tensors.plan
    expected = main_path_feature_nodes(onnx.load(case.legacy()["path"]))
    assert sum(n.op_type == "Conv" for n in expected) >= 4
    # the plan's feature tensors are exactly the ones counted from the ONNX graph alone ...
    assert len(plan.features) == len(expected), (len(plan.features), len(expected))
    assert set(plan.features) == {n.output[0] for n in expected}
    # ... and every one of them is mapped
    assert len(flow.layers) == len(plan.features)
    assert [layer.tensor for layer in flow.layers] == list(plan.features)
    assert set(flow.maps) == set(plan.features)
    assert flow.final_layer == plan.final
    for layer in flow.layers:
        assert layer.final or layer.solver is not None, layer.tensor
        m = flow.maps[layer.tensor]
        assert m.shape == tuple(layer.shape[2:]) and m.dtype == np.float32
        assert np.isfinite(m).all() and (m >= 0).all()


def test_parity_and_convergence(case):
    flow = case.flow()
    assert flow.parity["max_relative_error"] < 1e-4
    summary = flow.solver_summary()
    assert summary["solved"] > 0
    assert summary["all_converged"], summary
    assert summary["max_convergence"] <= 1e-4


def test_final_layer_property_1(case):
    """§8.1 on global-average-pool heads: NAFlow's final map equals Grad-CAM's. Flatten heads:
    NAFlow's final map equals gradient × activation (BPFM = A at the final tensor)."""
    flow = case.flow()
    final = flow.final_layer
    model = onnx.load(case.legacy()["path"], load_external_data=False)
    consumers = {n.op_type for n in model.graph.node if final in n.input}
    ours = flow.maps[final]
    if case.name in FLATTEN_HEADS:
        assert not consumers & GAP_HEAD_OPS, consumers
        A, lam = flow.tensors.A[final], flow.tensors.Lambda[final]
        ref = torch.relu((lam * A).sum(1))[0].float().numpy()
    else:
        assert consumers & GAP_HEAD_OPS, consumers
        ref = flow.compare_maps[final]
    assert np.linalg.norm(ref) > 0
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_abandonment_property_3(case):
    """§8.3: BPFM is exactly 0 wherever Lambda is 0 (dead ReLUs, MaxPool losers, padding)."""
    flow = case.flow()
    t = flow.tensors
    assert set(t.BPFM) >= set(flow.tensors.plan.features)
    zeros = 0
    for name, bpfm in t.BPFM.items():
        if name == flow.final_layer:
            continue
        dead = t.Lambda[name] == 0
        zeros += int(dead.sum())
        assert torch.all(bpfm[dead] == 0), name
    assert zeros > 0


def test_real_weights_see_a_cat(case):
    """Models with offline weights see the cat; the others say they are untrained."""
    if case.name not in REAL_WEIGHTS:
        assert case.spec.untrained
        return
    flow = case.flow()
    assert not case.spec.untrained, f"{case.name}: offline weights not installed (scripts/test.sh installs them)"
    top = [e["index"] for e in flow.target["top5"]]
    if case.name == "mobilenet-v2":
        assert top[0] == 285 and flow.target["label"] == "Egyptian cat"
    else:
        assert CAT_CLASSES & set(top[:3]), top


# ------------------------------------------- dynamo export (last: its worker ran meanwhile)
def test_export_dynamo(case):
    rep = case.dynamo()["report"]
    assert rep["exporter"] == "dynamo"
    assert rep["parity_relative_error"] < 1e-4


def test_ops_dynamo(case):
    _check_ops(case.dynamo()["ops"], f"{case.name} (dynamo)")


def test_dynamo_export_same_feature_layers(case):
    """The dynamo graph (no Identity copies, ReduceMean head, pads folded into convs) gives the
    same feature layers and the same final-layer map (gradient × activation there equals
    NAFlow's, which the legacy analysis computed)."""
    dyn = case.dynamo()
    assert dyn["flow_error"] is None, dyn["flow_error"]
    d = dyn["flow"]
    ref = case.flow()
    assert d["parity"] < 1e-4
    ref_layers = [(layer.op_type, tuple(layer.shape)) for layer in ref.layers]
    assert [x for x in d["layers"] if x[0] != "Pad"] == [x for x in ref_layers if x[0] != "Pad"]
    assert d["target"] == ref.target["index"]
    a, b = d["final_map"], ref.maps[ref.final_layer]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4


# -------------------------------------------------------------------------------- the gallery
def test_gallery_small(tmp_path):
    """naflow_onnx.gallery on the two smallest models: files, rows, captions' facts, index page."""
    import json

    from naflow_onnx.errors import NAFlowError
    from naflow_onnx.gallery import PLACEHOLDER_NOTE, build_gallery
    from naflow_onnx.gallery_cli import main

    out = tmp_path / "gallery"
    doc = build_gallery(out, models=["conv4net", "conv64f"], image=_chelsea(), progress=False)
    rows = json.loads((out / "gallery.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["conv4net", "conv64f"] == [r["model"] for r in doc["rows"]]
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None
        assert r["kind"] == "embedding" and r["weights"] == "untrained"
        assert r["target"]["placeholder"] and r["target_text"].startswith("PLACEHOLDER")
        assert r["layers"] == r["feature_layers"] > 0 and r["all_converged"]
        assert r["parity"] < 1e-4 and r["max_residual"] <= 1e-4 and r["analyze_s"] > 0
        assert (out / r["image"]).stat().st_size > 10_000 and (out / r["onnx"]).is_file()
        cap = r["caption"]
        assert r["model"] in cap["title"] and r["target_text"] in cap["title"]
        assert {"text": cap["notes"][0]["text"], "colour": "red"} == cap["notes"][0]
        assert cap["notes"][0]["text"].startswith("untrained weights")
    page = (out / "index.html").read_text()
    assert '<img src="conv4net.png"' in page and "placeholder" in page and "untrained" in page
    assert PLACEHOLDER_NOTE in doc["placeholder_target"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    with pytest.raises(NAFlowError, match="unknown model"):
        build_gallery(tmp_path / "x", models=["no-such-model"], progress=False)
    assert main(["--out", str(tmp_path / "y"), "--models", "no-such-model", "--quiet"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_gallery_caption_colours():
    import matplotlib.pyplot as plt

    from naflow_onnx.gallery import _caption_figure

    fig, _ = plt.subplots(1, 3, figsize=(6, 2))
    fig.suptitle("old")
    _caption_figure(fig, "resnet18 · target: class 1", [("untrained weights (...)", "red")])
    assert fig._suptitle.get_text() == "resnet18 · target: class 1"
    red = [t for t in fig.texts if t.get_text().startswith("untrained weights")]
    assert len(red) == 1 and red[0].get_color() == "red"
    plt.close(fig)


def test_gallery_failed_model_is_reported(tmp_path, monkeypatch):
    """A model that fails does not stop the gallery: its row says why, the command exits 2."""
    import json

    import exporters.torch_export
    from naflow_onnx.errors import NAFlowError
    from naflow_onnx.gallery_cli import main

    def broken(*args, **kwargs):
        raise NAFlowError("boom: export refused")
    monkeypatch.setattr(exporters.torch_export, "export", broken)
    out = tmp_path / "g"
    assert main(["--out", str(out), "--models", "conv4net", "--quiet"]) == 2
    row, = json.loads((out / "gallery.json").read_text())["rows"]
    assert row["status"] == "failed" and row["error"] == "NAFlowError: boom: export refused"
    assert "failed: NAFlowError: boom" in (out / "index.html").read_text()
