"""Detection bench (issue 16): one NAFlow flow of nudenet's YOLOv8n at 320 against its F+B.

    python bench/detect_perf.py [--repeats 3] [--threads 1] [--out bench/results/detect_perf.json]

Side by side in one process, on skimage's astronaut with ``--target FACE_FEMALE``:

  fb       torch forward of the rebuilt graph (forward.run_graph(track=True)) + backward of the
           detection objective (the box's class logit), as bench/perf.py's ``fb``
  naflow   Analyzer.analyze(image, objective=DetectionTarget(...)): the whole flow (letterbox,
           onnxruntime capture, parity, plan, target, Lambda, back-projection, maps)

Wall-clock medians over --repeats after one warm-up; torch and onnxruntime at --threads.
Damping: t = inf and the default t = 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/detect_perf.json"))
    args = ap.parse_args(argv)
    import numpy as np
    import skimage.data
    import torch
    torch.set_num_threads(args.threads)
    from naflow_onnx.capture import Capture
    from naflow_onnx.errors import NAFlowError
    from naflow_onnx.flow import Analyzer
    from naflow_onnx.forward import run_graph
    from naflow_onnx.importance import importance
    from naflow_onnx.targets import DetectionOptions, DetectionTarget, ImageFrame

    model = str(Path(importlib.util.find_spec("nudenet").submodule_search_locations[0]) / "320n.onnx")
    image = skimage.data.astronaut()
    target = DetectionTarget(DetectionOptions(target="FACE_FEMALE"))
    rows = {}
    for damp in (math.inf, 1.0):
        an = Analyzer(model, damp=damp, device="cpu")
        an.capture = Capture(an.graph.model, "cpu", threads=args.threads)
        point = an.prepare(image, objective=target)
        x = torch.from_numpy(an.preprocess.to_input(point.view))
        objective = target.bind(an.graph, point.env, an.labels,
                                ImageFrame.of(image, point.view, an.preprocess.resize))

        def fb():
            values = run_graph(an.graph, x, torch.device("cpu"), track=True)
            return importance(values, objective, point.plan.data)

        def flow():
            return an.analyze(image, objective=target)

        row = {"fb_s": _median_s(fb, args.repeats)}
        try:
            row["naflow_s"] = _median_s(flow, args.repeats)
            row["ratio"] = row["naflow_s"] / row["fb_s"]
            f = flow()
            row["solver"] = f.solver_summary()
            row["layers"] = len(f.layers)
        except NAFlowError as exc:
            row["error"] = str(exc)
        rows["inf" if math.isinf(damp) else f"{damp:g}"] = row
        print(f"damp {damp:g}: " + json.dumps(row), flush=True)
    doc = {"schema": "naflow-onnx/detect-perf", "model": "nudenet 3.4.2 320n.onnx (YOLOv8n)",
           "input": [320, 320], "image": "skimage astronaut", "target": "FACE_FEMALE",
           "threads": args.threads, "repeats": args.repeats, "machine": platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__, "results": rows}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
