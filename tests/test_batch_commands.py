"""The multi-image commands with --batch (issue 17): analyze, check, baseline and evaluate give the
chunks of images to the batched stages (``Analyzer.analyze_many``, ``prepare_many``,
``backproject_many``) and give what the one-by-one run gives, within 1e-4 (a batched engine
differs in the last bits); a bad image inside a batch fails alone.

Every run here is local (in this process), so the batched stages can be watched: a spy
records each call's image count, which proves that the batched path ran at all."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compare import ATOL, assert_close
from exporters.torch_export import export
from smallnets import RedDetector
from naflow_onnx.check import main_baseline, main_check
from naflow_onnx.check.run import clear_memo
from naflow_onnx.cli import main as cli_main
from naflow_onnx.flow import Analyzer

@pytest.fixture
def spy(monkeypatch):
    """name -> [image count of each call with several images] of the Analyzer's batched stages
    (in this process; a lone image goes through them too, as their one-image case)."""
    calls = {"analyze_many": [], "prepare_many": [], "backproject_many": []}
    for name, arg in (("analyze_many", "images"), ("prepare_many", "images"),
                      ("backproject_many", "points")):
        original = getattr(Analyzer, name)

        def wrapped(self, first, *args, _name=name, _original=original, **kwargs):
            first = list(first)
            if len(first) > 1:
                calls[_name].append(len(first))
            return _original(self, first, *args, **kwargs)
        monkeypatch.setattr(Analyzer, name, wrapped)
    return calls


@pytest.fixture(scope="module")
def red(tmp_path_factory):
    """A small detector of red squares, four 32x32 images with a red square and a check
    configuration with their boxes."""
    root = tmp_path_factory.mktemp("batch")
    model = root / "red.onnx"
    export(RedDetector(), model, (1, 3, 32, 32), preprocess="none")
    rng = np.random.default_rng(7)
    images, expects = [], []
    for i in range(4):
        img = (rng.random((32, 32, 3)) * 150).astype(np.uint8)
        img[..., 0] = np.minimum(img[..., 0], img[..., 1])
        x0, y0 = (int(v) for v in rng.integers(0, 20, 2))
        img[y0:y0 + 12, x0:x0 + 12] = [230, 40, 40]
        path = root / f"r{i}.png"
        Image.fromarray(img).save(path)
        images.append(path)
        expects.append(f'[[expect]]\nimage = "r{i}.png"\nclass = 0\n'
                       f'box = [{x0}, {y0}, {x0 + 12}, {y0 + 12}]\n')
    cfg = root / "naflow-check.toml"
    cfg.write_text('[inputs]\nimages = "r*.png"\npreprocess = "none"\n' + "\n".join(expects) +
                   "[checks]\nprediction = true\nfinal_mass_in_region = 0.3\n"
                   "flow_stability = 0.5\n")
    return {"root": root, "model": model, "images": images, "config": cfg}


def comparable_flow(folder: Path) -> dict:
    """flow.json without what a batched solve may change beyond the maps' tolerance: timings
    and the solver's iteration records."""
    doc = json.loads((folder / "flow.json").read_text())
    for k in ("timings", "solver_summary"):
        doc.pop(k)
    doc["options"].pop("batch")         # how many images were solved together
    for layer in doc["layers"]:
        layer.pop("solver", None)
    return doc


def assert_same_analyses(one: Path, batched: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in batched.iterdir()) == names
    for name in names:
        if not (one / name).is_dir():
            continue
        assert sorted(p.name for p in (batched / name).iterdir()) == \
            sorted(p.name for p in (one / name).iterdir())
        assert_close(comparable_flow(one / name), comparable_flow(batched / name), name)
        with np.load(one / name / "maps.npz") as a, np.load(batched / name / "maps.npz") as b:
            assert sorted(a.files) == sorted(b.files) and len(a.files) >= 5
            for k in a.files:
                np.testing.assert_allclose(b[k], a[k], atol=ATOL, rtol=0, err_msg=f"{name} {k}")


def analyze(model, images, out, *extra) -> int:
    return cli_main(["analyze", str(model), *map(str, images), "--out", str(out), "--json",
                     *map(str, extra)])


def test_analyze_batch_2_gives_the_batch_1_results_on_mobilenet(mobilenet_onnx, photos, tmp_path,
                                                                spy, capsys):
    """Three photos on the real MobileNetV2: --batch 2 analyses the first two together (one
    analyze_many call of 2 images) and the third alone; files, summary and maps are those of
    --batch 1, which never calls the batched stage. The maps of the 10 residual sums and the
    final layer only (the back-projection still walks the whole network; drawing 97 layers
    would take most of the test's time)."""
    images = [photos[k] for k in ("chelsea", "coffee", "astronaut")]
    layers = ("--layers", "Add_output_0$")
    assert analyze(mobilenet_onnx, images, tmp_path / "one", "--batch", "1", *layers) == 0
    one = json.loads(capsys.readouterr().out)
    assert spy["analyze_many"] == []
    assert analyze(mobilenet_onnx, images, tmp_path / "two", "--batch", "2", *layers) == 0
    two = json.loads(capsys.readouterr().out)
    assert spy["analyze_many"] == [2]
    assert [s["label"] for s in one] == [s["label"] for s in two]
    for s in one + two:
        s.pop("seconds"), s.pop("out"), s.pop("solver")
    assert_close(one, two)
    assert_same_analyses(tmp_path / "one", tmp_path / "two")
    solved_with = [json.loads((tmp_path / d / name / "flow.json").read_text())["options"]["batch"]
                   for d in ("one", "two") for name in sorted(p.name for p in (tmp_path / d).iterdir()
                                                              if p.is_dir())]
    assert solved_with == [1, 1, 1, 2, 2, 1]   # the first two photos in one batched solve


def test_a_bad_image_in_a_batch_fails_alone(red, tmp_path, spy, capsys):
    """A broken file in the middle of a batch of three: the batch raises, its images are run
    one by one, the broken one fails alone (failures.json) and the other two are written as a
    one-by-one run writes them."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    images = [red["images"][0], bad, red["images"][1]]
    assert analyze(red["model"], images, tmp_path / "three", "--batch", "3") == 2
    assert "broken.png" in capsys.readouterr().err
    assert spy["analyze_many"] == [3]
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == \
        [".naflow-output", "000_r0", "002_r1", "failures.json"]
    fails = json.loads((tmp_path / "three" / "failures.json").read_text())
    assert fails["images"] == 3 and [(f["index"], Path(f["image"]).name) for f in fails["failed"]] \
        == [(1, "broken.png")]
    assert analyze(red["model"], images, tmp_path / "single", "--batch", "1") == 2
    capsys.readouterr()
    assert_same_analyses(tmp_path / "single", tmp_path / "three")


def test_bad_batch_is_one_line_exit_2(red, tmp_path, capsys):
    assert analyze(red["model"], red["images"][:2], tmp_path / "o", "--batch", "0") == 2
    assert capsys.readouterr().err.strip().splitlines() == ["naflow: error: --batch must be >= 1, got 0"]
    assert not (tmp_path / "o").exists()


def comparable_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    for k in ("timings", "jobs", "backend"):
        report.pop(k)
    return report


def test_check_and_baseline_batch_2_report_what_batch_1_reports(red, tmp_path, spy):
    """naflow check and naflow baseline over four images: --batch 2 analyses them two by two
    (memo cleared: every image is analysed again); the verdicts and numbers of the report and
    the baseline's maps are those of --batch 1."""
    reports, baselines = {}, {}
    for batch in ("1", "2"):
        clear_memo()
        out = tmp_path / f"report{batch}"
        code = main_check([str(red["model"]), "--config", str(red["config"]), "--out", str(out),
                           "--quiet", "--batch", batch])
        assert code == 0
        reports[batch] = comparable_report(out / "report.json")
        clear_memo()
        baselines[batch] = tmp_path / f"baseline{batch}.npz"
        assert main_baseline([str(red["model"]), "--config", str(red["config"]), "-o",
                              str(baselines[batch]), "--quiet", "--batch", batch]) == 0
    assert spy["analyze_many"] == [2, 2, 2, 2]         # check, then baseline: two batches each
    assert reports["1"]["summary"] == reports["2"]["summary"] == {
        "images": 4, "checks": 12, "passed": 12, "failed": 0, "skipped": 0, "errors": 0}
    assert_close(reports["1"], reports["2"])
    with np.load(baselines["1"]) as a, np.load(baselines["2"]) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if a[k].dtype.kind == "f":
                np.testing.assert_allclose(b[k], a[k], atol=ATOL, rtol=0, err_msg=k)
            else:
                assert np.array_equal(a[k], b[k]), k


def test_evaluate_batch_2_scores_what_batch_1_scores(tmp_path, spy):
    """naflow evaluate on three synthetic images with naflow at two dampings, Grad-CAM and the
    randomisation test on the first two: --batch 2 prepares [0, 1] together and back-projects
    them together at each damping, on the model and on each randomised model, then [2] alone;
    every score equals the one-by-one run's."""
    from naflow_onnx.evaluate import EvaluateOptions, run
    from conftest import ROOT
    common = dict(n=3, methods=("naflow", "gradcam"), damps=(0.1, 1.0), randomise_images=2,
                  randomise_steps=2, steps=5)
    one = run(ROOT / "models" / "synth_plain.onnx", EvaluateOptions(**common, batch=1))
    assert spy["prepare_many"] == spy["backproject_many"] == []
    two = run(ROOT / "models" / "synth_plain.onnx", EvaluateOptions(**common, batch=2))
    cascade = len(one.cascade)
    assert cascade == 2
    # the model and its two randomised versions: one prepare_many of [0, 1] each; two
    # dampings -> two backproject_many each
    assert spy["prepare_many"] == [2] * (1 + cascade)
    assert spy["backproject_many"] == [2] * (2 * (1 + cascade))
    assert [r["index"] for r in one.results] == [r["index"] for r in two.results] == [0, 1, 2]
    for a, b in zip(one.results, two.results):
        assert a["tensors"] == b["tensors"] and a["target"] == b["target"]
        assert np.isfinite(a["scores"]).any()
        np.testing.assert_allclose(b["scores"], a["scores"], atol=ATOL, rtol=0)
        if a["randomisation"] is None:
            assert b["randomisation"] is None and a["index"] == 2
        else:
            assert np.isfinite(a["randomisation"]).any()
            np.testing.assert_allclose(b["randomisation"], a["randomisation"], atol=ATOL, rtol=0)
