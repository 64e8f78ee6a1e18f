"""Never delete what naflow did not write (issue 14, naflow_onnx/io.py, README "Output contract").

Every command that writes (analyze with one or many images and --resume, check, baseline,
evaluate, gallery, export) is pointed at places it must not touch: a folder holding a user's
file, an existing file, the current folder, a parent of it, a symbolic link. Each is refused with
one line naming the path, exit 2, and the user's file is still there with its content, with
nothing added next to it. What may be written is: a new path, an empty folder, naflow's own
earlier output (the ``.naflow-output`` marker), and for ``-o`` files their own kind of file.

Two runs racing for one output folder are made to interleave at known points
(``naflow_onnx.testhooks``): the result is one whole run's files and no temporary is left.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from naflow_onnx import testhooks
from naflow_onnx.check import main_baseline, main_check
from naflow_onnx.cli import main as cli_main
from naflow_onnx.evaluate.cli import main as evaluate_main
from naflow_onnx.gallery_cli import main as gallery_main
from naflow_onnx.io import MARKER

from conftest import ROOT

USER_TEXT = "the user's own notes\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory, small_models):
    """A chain model, two images and a check configuration in a folder of their own."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / name)
    cfg = root / "check.toml"
    cfg.write_text('[inputs]\nimages = ["a.png"]\npreprocess = "none"\n'
                   '[checks]\nflow_stability = 0.1\n')
    return {"model": small_models["chain"][1], "a": root / "a.png", "b": root / "b.png",
            "config": cfg}


def analyze(p, out, *extra):
    return cli_main(["analyze", str(p["model"]), str(p["a"]), "--out", str(out), "--quiet",
                     *map(str, extra)])


# the command of each case, writing to ``out``
COMMANDS = {
    "analyze": analyze,
    "analyze-many-resume": lambda p, out: cli_main(
        ["analyze", str(p["model"]), str(p["a"]), str(p["b"]), "--out", str(out), "--quiet",
         "--resume"]),
    "check": lambda p, out: main_check([str(p["model"]), "--config", str(p["config"]),
                                        "--out", str(out), "--quiet"]),
    "evaluate": lambda p, out: evaluate_main([str(ROOT / "models" / "synth_plain.onnx"), "--n",
                                              "2", "--out", str(out), "--quiet"]),
    "gallery": lambda p, out: gallery_main(["--out", str(out), "--models", "conv4net",
                                            "--quiet"]),
}
FILE_COMMANDS = {       # commands writing one file (-o)
    "baseline": lambda p, out: main_baseline([str(p["model"]), "--config", str(p["config"]),
                                              "-o", str(out), "--quiet"]),
    "export": lambda p, out: cli_main(["export", "smallnets:RedDetector", "--input-shape",
                                       "1,3,32,32", "-o", str(out)]),
}


def listing(folder: Path) -> dict:
    """Every path under ``folder`` with its content (files) or None (folders, links)."""
    return {str(q.relative_to(folder)): (q.read_bytes() if q.is_file() and not q.is_symlink()
                                         else None) for q in sorted(folder.rglob("*"))}


def assert_refused(code, capsys, needle: str, before: dict, folder: Path, path: Path):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and f"'{path}'" in lines[0], err
    assert listing(folder) == before     # nothing touched, nothing added (no temporaries)


def foreign_folder(tmp: Path) -> tuple[Path, Path]:
    out = tmp / "work"
    out.mkdir()
    (out / "notes.txt").write_text(USER_TEXT)
    return out, tmp


def foreign_file(tmp: Path) -> tuple[Path, Path]:
    out = tmp / "notes.txt"
    out.write_text(USER_TEXT)
    return out, tmp


def current_folder(tmp: Path) -> tuple[Path, Path]:
    (tmp / "notes.txt").write_text(USER_TEXT)
    return Path("."), tmp


def parent_folder(tmp: Path) -> tuple[Path, Path]:
    (tmp / "notes.txt").write_text(USER_TEXT)
    (tmp / "sub").mkdir()
    os.chdir(tmp / "sub")
    return Path(".."), tmp


def symlink(tmp: Path) -> tuple[Path, Path]:
    (tmp / "real").mkdir()
    (tmp / "real" / "notes.txt").write_text(USER_TEXT)
    (tmp / "link").symlink_to(tmp / "real")
    return tmp / "link", tmp


TARGETS = {"foreign-folder": (foreign_folder, "holds files naflow did not write"),
           "file": (foreign_file, "is an existing file"),
           "current-folder": (current_folder, "is the current folder or one of its parents"),
           "parent-folder": (parent_folder, "is the current folder or one of its parents"),
           "symlink": (symlink, "is a symbolic link")}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("command", COMMANDS)
def test_folder_commands_refuse_what_naflow_did_not_write(project, tmp_path, monkeypatch, capsys,
                                                         command, target):
    monkeypatch.chdir(tmp_path)
    make, needle = TARGETS[target]
    out, watched = make(tmp_path)
    before = listing(watched)
    assert USER_TEXT.encode() in before.values()
    code = COMMANDS[command](project, out)
    assert_refused(code, capsys, needle, before, watched, out)


@pytest.mark.parametrize("target,needle", [
    ("text", "is not "), ("folder", "is not a file"), ("symlink", "is a symbolic link")])
@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_file_commands_refuse_foreign_files(project, tmp_path, capsys, command, target, needle):
    out = tmp_path / "out.file"
    if target == "text":
        out.write_text(USER_TEXT)
    elif target == "folder":
        out.mkdir()
        (out / "notes.txt").write_text(USER_TEXT)
    else:
        (tmp_path / "notes.txt").write_text(USER_TEXT)
        out.symlink_to(tmp_path / "notes.txt")
    before = listing(tmp_path)
    code = FILE_COMMANDS[command](project, out)
    assert_refused(code, capsys, needle, before, tmp_path, out)


def test_empty_folder_is_used_and_own_output_replaced(project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert analyze(project, out) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["schema"] == "naflow-onnx/output" and marker["command"] == "analyze"
    first = json.loads((out / "flow.json").read_text())["target"]["index"]
    other = 1 - first
    assert analyze(project, out, "--target", other) == 0          # naflow's own: replaced
    assert json.loads((out / "flow.json").read_text())["target"]["index"] == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_partial_folder_of_a_resume_run_follows_the_rule(project, tmp_path, capsys):
    """A foreign folder at the --resume staging name is refused, not removed."""
    out = tmp_path / "many"
    stage = tmp_path / ".many.partial"
    stage.mkdir()
    (stage / "notes.txt").write_text(USER_TEXT)
    before = listing(tmp_path)
    for extra in ([], ["--resume"]):
        code = cli_main(["analyze", str(project["model"]), str(project["a"]), str(project["b"]),
                         "--out", str(out), "--quiet", *extra])
        assert_refused(code, capsys, "holds files naflow did not write", before, tmp_path, stage)


def test_export_and_baseline_overwrite_their_own_kind(project, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(Path(project["model"]).read_bytes())     # an ONNX model: may be replaced
    assert FILE_COMMANDS["export"](project, model) == 0
    names = {n.op_type for n in onnx.load(str(model)).graph.node}
    assert names != {n.op_type for n in onnx.load(str(project["model"])).graph.node}
    base = tmp_path / "b.npz"
    for _ in range(2):          # absent, then its own earlier baseline
        assert FILE_COMMANDS["baseline"](project, base) == 0
        with np.load(base) as z:
            assert json.loads(bytes(z["meta"]).decode())["schema"] == "naflow-onnx/baseline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz", "m.onnx"]


# ------------------------------------------------------------------------------------------------
# two runs racing for one folder


def whole_result(out: Path, reference: Path) -> None:
    """``out`` holds exactly the files of the run that wrote ``reference``."""
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in ("maps.npz", "flow.png"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    jo, jr = (json.loads((d / "flow.json").read_text()) for d in (out, reference))
    jo.pop("timings"), jr.pop("timings")
    assert jo == jr


@pytest.fixture(scope="module")
def references(project, tmp_path_factory):
    """The result folders of the two racing runs, each run alone: target 0 and target 1."""
    root = tmp_path_factory.mktemp("refs")
    for t in (0, 1):
        assert analyze(project, root / f"t{t}", "--target", t) == 0
    return root


@pytest.mark.parametrize("point", ["output.replace", "output.moved-aside"])
def test_two_runs_racing_end_with_one_whole_result(project, references, tmp_path, point):
    """Run A is held at ``point`` of its final rename while run B writes the same folder from
    start to end; then A goes on. A finishes last, so its result is the one kept, whole; both
    exit 0 and no temporary folder is left. ("output.moved-aside": A has already moved the
    earlier output away when B renames its own result into place.)"""
    out = tmp_path / "out"
    assert analyze(project, out, "--target", 1) == 0      # an earlier output: A replaces it
    codes = []

    def run_b(count):
        if count == 1:                                     # A's first arrival only
            codes.append(analyze(project, out, "--target", 1))
    with testhooks.pause(point, run_b):
        codes.insert(0, analyze(project, out, "--target", 0))
    assert codes == [0, 0]
    whole_result(out, references / "t0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_on_a_folder_in_progress_is_refused(project, references, tmp_path, capsys):
    """Run A over two images is held at its second image, its first already in the staging
    folder; run B on the same --out (with or without --resume) is refused with one line and
    leaves A's staging folder alone; A then finishes whole."""
    out = tmp_path / "many"
    args = ["analyze", str(project["model"]), str(project["a"]), str(project["b"]),
            "--out", str(out), "--quiet", "--batch", "1"]    # one by one: a is done when b starts
    seen = []

    def run_b(count):
        if count == 2:
            before = listing(tmp_path)
            assert sorted(before) == [".many.partial", ".many.partial/.naflow-output",
                                      ".many.partial/000_a", *(
                                          f".many.partial/000_a/{f}" for f in
                                          (".naflow-state.json", "flow.json", "flow.png",
                                           "maps.npz"))]
            capsys.readouterr()
            for extra in ([], ["--resume"]):
                code = cli_main(args + extra)
                seen.append(code)
                assert_refused(code, capsys, "is being written by another naflow run", before,
                               tmp_path, out)
    with testhooks.pause("analyze.image", run_b):
        assert cli_main(args) == 0
    assert seen == [2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "000_a", "001_b"]
