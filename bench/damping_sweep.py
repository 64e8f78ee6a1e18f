"""Damping sweep (METHOD.md §4 note): share of each layer's positive map mass inside a hand-drawn
object box, per network stage, for NAFlow at several damping values t and for the comparison
methods, on the real MobileNetV2 and skimage photos (data/photo_boxes.json).

    python bench/damping_sweep.py models/mobilenet_v2.onnx [--damps 0,0.01,0.03,0.1,0.3,1,inf]

Prints a table (rows: method / t, columns: early, middle, late, final stage; each the mean over
photos and the stage's layers of energy-in-box) and writes bench/results/damping_sweep.json.
Solves run to convergence (tolerance 1e-4 on every node; an unconverged node is reported).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import naflow_onnx as nf  # noqa: E402
from naflow_onnx.preprocess import map_box  # noqa: E402

PHOTOS = ("coffee", "astronaut", "motorcycle", "rocket")


def energy(heat: np.ndarray, box) -> float:
    x0, y0, x1, y1 = box
    total = float(heat.sum())
    return float(heat[y0:y1, x0:x1].sum()) / total if total > 0 else float("nan")


def stages(n: int) -> dict[str, slice]:
    third = n // 3
    return {"early": slice(0, third), "middle": slice(third, 2 * third),
            "late": slice(2 * third, n - 1), "final": slice(n - 1, n)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--damps", default="inf,1,0.3,0.1,0.03,0.01,0")
    ap.add_argument("--photos", default=",".join(PHOTOS))
    args = ap.parse_args()
    boxes = json.loads((ROOT / "data" / "photo_boxes.json").read_text())
    data = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    damps = [math.inf if d == "inf" else float(d) for d in args.damps.split(",")]
    rows: dict[str, dict] = {}
    for damp in damps:
        analyzer = nf.Analyzer(args.model, damp=damp, tol=1e-4, max_iter=5000)
        methods = [("naflow", f"naflow t={damp:g}")]
        if damp == damps[0]:
            methods += [("gradcam", "gradcam"), ("layercam", "layercam"), ("gradxact", "gradxact")]
        for method, key in methods:
            per_stage: dict[str, list] = {}
            t0, worst = time.perf_counter(), 0.0
            for photo in args.photos.split(","):
                spec = boxes[photo]
                flow = analyzer.analyze(data / spec["file"], method=method)
                box = map_box(spec["box"], tuple(spec["size"]), flow.image.shape[:2])
                values = [energy(flow.resized(layer.tensor), box) for layer in flow.layers]
                for name, sl in stages(len(values)).items():
                    per_stage.setdefault(name, []).extend(values[sl])
                worst = max(worst, flow.solver_summary()["max_convergence"])
            rows[key] = {k: float(np.nanmean(v)) for k, v in per_stage.items()}
            rows[key]["seconds"] = time.perf_counter() - t0
            rows[key]["max_convergence"] = worst
            print(f"{key:<18} " + "  ".join(f"{k} {v:.3f}" for k, v in rows[key].items()), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "damping_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
