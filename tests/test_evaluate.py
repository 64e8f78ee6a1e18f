"""``naflow evaluate``: the per-layer benchmark on a shipped synthetic net and on MobileNetV2.

One evaluation per model is shared by all assertions (module fixtures)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from naflow_onnx.evaluate.report import stage_of
from naflow_onnx.evaluate.cli import main
from naflow_onnx.evaluate.run import cascade_steps

from conftest import ROOT
from test_cli import run_cli

PLAIN = ROOT / "models" / "synth_plain.onnx"
N_IMAGES = 6


@pytest.fixture(scope="module")
def plain_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "plain"
    rc = main([str(PLAIN), "--out", str(out), "--n", str(N_IMAGES), "--randomise-images", "3",
               "--randomise-steps", "3", "--quiet"])
    assert rc == 0
    doc = json.loads((out / "evaluation.json").read_text())
    npz = dict(np.load(out / "per_image.npz"))
    return out, doc, npz


def test_cascade_and_stages():
    assert cascade_steps(6, 4) == [1, 3, 4, 6]
    assert cascade_steps(6, 1) == [6]
    assert cascade_steps(2, 4) == [1, 2]
    assert cascade_steps(0, 4) == []
    st = stage_of(10, 9)
    assert st == ["early"] * 3 + ["middle"] * 3 + ["late"] * 3 + ["final"]


def test_files_and_schema(plain_eval):
    out, doc, npz = plain_eval
    assert sorted(p.name for p in out.iterdir()) == [".naflow-output", "evaluation.json", "metrics.csv",
                                                    "metrics.png", "per_image.npz", "summary.md"]
    assert doc["schema"] == "naflow-onnx/evaluation" and doc["schema_version"] == 1
    names = [v["name"] for v in doc["variants"]]
    assert names == ["naflow", "reference", "gradcam", "layercam", "gradxact"]
    L = len(doc["layers"])
    assert L == 14 and doc["images"]["evaluated"] == N_IMAGES and doc["images"]["failed"] == 0
    assert npz["scores"].shape == (N_IMAGES, 5, L, 4)
    assert npz["randomisation"].shape == (N_IMAGES, 3, 5, L)
    assert np.isfinite(npz["randomisation"][:3]).any() and np.isnan(npz["randomisation"][3:]).all()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 5 * L * 5            # variants x layers x (4 metrics + randomisation)
    r = next(r for r in rows if r["variant"] == "gradcam" and r["metric"] == "energy" and r["layer_index"] == "3")
    assert math.isclose(float(r["mean"]), doc["per_layer"]["energy"]["gradcam"]["mean"][3], rel_tol=1e-5)
    assert [la["stage"] for la in doc["layers"]][-1] == "final" and doc["layers"][-1]["final"]
    # the shipped net classifies the benchmark images (it was trained to >= 95 %)
    assert doc["images"]["accuracy"] >= 5 / 6
    assert doc["solver"]["naflow"]["all_converged"] and doc["solver"]["naflow"]["max_convergence"] <= 1e-4


def test_scores_are_in_range_and_consistent(plain_eval):
    _, doc, npz = plain_eval
    s = npz["scores"]
    assert np.nanmin(s) >= 0 and np.nanmax(s) <= 1
    # METHOD.md §8: the final layer's NAFlow map is Grad-CAM's, so every metric agrees there
    v = list(npz["variants"])
    fin = -1
    np.testing.assert_allclose(s[:, v.index("naflow"), fin], s[:, v.index("gradcam"), fin], atol=2e-3)
    # after a ReLU (A >= 0) the released code's map equals LayerCAM's: identical scores
    relu = [j for j, la in enumerate(doc["layers"]) if la["op_type"] == "Relu"]
    assert relu
    np.testing.assert_array_equal(s[:, v.index("reference")][:, relu], s[:, v.index("layercam")][:, relu])


def test_maps_localise_and_are_faithful(plain_eval):
    """Real properties of a net that looks at the target: final-layer maps put far more mass on
    the object than its area, and deleting by the map drops the class faster than inserting
    by it raises it from the blurred image (deletion AUC < insertion AUC)."""
    _, doc, npz = plain_eval
    frac = doc["images"]["mean_mask_fraction"]
    assert 0.03 < frac < 0.2
    for name in ("naflow", "gradcam", "layercam"):
        assert doc["stages"]["energy"][name]["final"] > 2 * frac
        assert doc["stages"]["deletion"][name]["final"] < doc["stages"]["insertion"][name]["final"]


def test_randomisation_destroys_the_maps(plain_eval):
    """Adebayo et al.: with every weight layer randomised the maps must no longer match."""
    _, doc, _ = plain_eval
    full = doc["stages"]["randomisation"]
    for name in ("naflow", "gradcam", "layercam"):
        assert full[name]["final"] < 0.5, (name, full[name])
    cascade = doc["randomisation"]["cascade"]
    assert [c["k"] for c in cascade] == [1, 4, 6]


def test_damping_variants_and_cli(tmp_path):
    out = tmp_path / "damps"
    rc, stdout, stderr = run_cli("evaluate", PLAIN, "--out", out, "--n", "2", "--methods", "naflow,gradcam",
                                 "--damps", "0.1,inf", "--randomise-images", "0", "--steps", "5")
    assert rc == 0, stderr
    doc = json.loads((out / "evaluation.json").read_text())
    assert [v["name"] for v in doc["variants"]] == ["naflow@t=0.1", "naflow@t=inf", "gradcam"]
    assert doc["variants"][1]["damp"] == "inf" and "randomisation" not in doc["metrics"]
    assert "energy inside the mask" in stdout


@pytest.mark.parametrize("args, expect", [
    (["--methods", "naflow,bogus"], "--methods: unknown bogus"),
    (["--dataset", "missing.npz"], "data set not found"),
    (["--methods", "gradcam", "--damps", "0.1"], "--damps needs naflow"),
    (["--damps", "0.1,x"], "'x' is not a number"),
    (["--dataset", "photos", "--photos", "nosuch"], "unknown photo(s) nosuch"),
])
def test_bad_arguments(tmp_path, args, expect):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("evaluate", PLAIN, "--out", out, "--n", "1", *args)
    assert rc == 2 and expect in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_photos_on_mobilenet(mobilenet_onnx, tmp_path):
    """The real-photo benchmark on the real MobileNetV2 (a few layers, to keep CI short):
    the cat box holds most of every method's final map, and naflow's final map equals Grad-CAM's."""
    out = tmp_path / "photos"
    rc = main([str(mobilenet_onnx), "--out", str(out), "--dataset", "photos", "--photos", "chelsea,coffee",
               "--layers", "op:Add", "--methods", "naflow,gradcam,layercam", "--steps", "8",
               "--randomise-images", "0", "--quiet"])
    assert rc == 0
    doc = json.loads((out / "evaluation.json").read_text())
    npz = dict(np.load(out / "per_image.npz"))
    assert doc["dataset"]["photos"] == ["chelsea", "coffee"] and npz["predicted"][0] == 285
    assert len(doc["layers"]) == 11     # the 10 residual Adds + the final layer
    s = npz["scores"]
    np.testing.assert_allclose(s[:, 0, -1], s[:, 1, -1], atol=2e-3)
    # chelsea: the box covers most of the frame, so energy there is high for every method
    assert (s[0, :, -1, 0] > 0.8).all()


def test_compare_ranks_variants():
    """The damping choice: mean rank over models and metrics, by each metric's direction."""
    from naflow_onnx.evaluate.compare import compare

    def doc(name, e, d):
        return {"model": {"name": name},
                "higher_is_better": {"energy": True, "pointing": True, "deletion": False, "insertion": True},
                "stages": {"energy": {k: {"all internal": v} for k, v in e.items()},
                           "pointing": {k: {"all internal": 0.5} for k in e},
                           "deletion": {k: {"all internal": v} for k, v in d.items()},
                           "insertion": {k: {"all internal": None} for k in e}}}
    r = compare([doc("a", {"x": 0.9, "y": 0.5}, {"x": 0.2, "y": 0.3}),
                 doc("b", {"x": 0.4, "y": 0.6}, {"x": 0.1, "y": 0.4})])
    # x: energy ranks 1, 2; deletion 1, 1; pointing tied 1.5, 1.5 -> mean 1.33; y: 2, 1, 2, 2, 1.5, 1.5
    assert r["best"] == "x"
    assert abs(r["mean_rank"]["x"] - 8 / 6) < 1e-12 and abs(r["mean_rank"]["y"] - 10 / 6) < 1e-12


def test_backends_agree(tmp_path):
    """--jobs 2 (local processes) and --backend ray give the same numbers as one process."""
    common = ["--n", "3", "--methods", "naflow,gradcam", "--randomise-images", "1", "--randomise-steps", "2",
              "--steps", "5"]
    outs = {}
    for name, extra in (("one", []), ("jobs", ["--jobs", "2"]), ("ray", ["--backend", "ray", "--workers", "2"])):
        rc, _, stderr = run_cli("evaluate", PLAIN, "--out", tmp_path / name, *common, *extra)
        assert rc == 0, stderr
        outs[name] = dict(np.load(tmp_path / name / "per_image.npz"))
    for name in ("jobs", "ray"):
        np.testing.assert_allclose(outs[name]["scores"], outs["one"]["scores"], atol=1e-6)
        np.testing.assert_allclose(outs[name]["randomisation"], outs["one"]["randomisation"], atol=1e-6)


def test_pointing_game_recomputed_at_the_final_layer(plain_eval):
    """The pointing game of the final layer's Grad-CAM map, recomputed here from the map (torch
    bilinear upsampling, float64): a hit (1) or miss (0) at a unique maximum, the share of tied
    maxima inside the mask otherwise. It used to be asserted only as "0/1 or in [0, 1]", which
    the range check already implied."""
    import torch
    from naflow_onnx.evaluate.datasets import synthetic_items
    from naflow_onnx.flow import Analyzer

    _, _, npz = plain_eval
    v = list(npz["variants"])
    items = {it.index: it for it in synthetic_items(N_IMAGES, seed=3, size=96)}
    analyzer = Analyzer(PLAIN)
    binary = 0
    for row, index in enumerate(npz["image_index"]):
        item = items[int(index)]
        flow = analyzer.analyze(item.image, target=int(npz["target"][row]), method="gradcam")
        m = torch.tensor(flow.maps[flow.final_layer], dtype=torch.float64)[None, None]
        mask = item.mask_for(flow.image.shape[:2])
        up = torch.nn.functional.interpolate(m, size=mask.shape, mode="bilinear",
                                             align_corners=False)[0, 0].numpy()
        top = up >= up.max() - 1e-12 * max(abs(float(up.max())), 1e-30)
        expected = float(mask[top].mean())
        binary += top.sum() == 1
        assert npz["scores"][row, v.index("gradcam"), -1, 1] == pytest.approx(expected, abs=1e-9)
    assert binary >= 1         # at least one image decides by a unique maximum: 0 or 1


def test_library_call_equals_the_command(plain_eval):
    """evaluate.run with typed options (no argparse) scores what the command scored: the first two
    images, Grad-CAM alone, equal the command's Grad-CAM rows."""
    from naflow_onnx.evaluate import EvaluateOptions, run

    _, _, npz = plain_eval
    ev = run(str(PLAIN), EvaluateOptions(n=2, methods=("gradcam",), randomise_images=0))
    assert [v.name for v in ev.variants] == ["gradcam"] and list(ev.tensors) == list(npz["tensors"])
    v = list(npz["variants"]).index("gradcam")
    np.testing.assert_array_equal(ev.scores[:, 0], npz["scores"][:2, v])


def test_diverged_back_projection_is_an_error():
    """A non-finite BPFM (a diverged solve) is refused with a clear message, never drawn."""
    import torch
    from naflow_onnx.errors import NAFlowError
    from naflow_onnx.flow import BPFMResult

    ok = BPFMResult({"a": torch.ones(2), "b": None}, {}, 0.3, 0.0)
    assert ok.error() is None and ok.check() is ok
    bad = BPFMResult({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, {}, 0.01, 0.0)
    with pytest.raises(NAFlowError, match=r"diverged at damping t = 0.01: 1 tensors hold non-finite values \(first 'b'\)"):
        bad.check()


def test_jobs_workers_exit_with_a_killed_evaluate(tmp_path):
    """A killed `naflow evaluate --jobs 2` leaves no worker computing on (they watch their parent)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "naflow_onnx.cli", "evaluate", str(PLAIN), "--n", "50",
                             "--jobs", "2", "--quiet", "--out", str(tmp_path / "out")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children():
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines()
                if "multiprocessing" in line and int(line.split()[1]) == proc.pid]

    deadline = time.time() + 120
    while len(workers := children()) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert len(workers) >= 2, "the worker processes did not start"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert not alive, f"workers still running after their parent was killed: {alive}"
    assert not (tmp_path / "out").exists()
