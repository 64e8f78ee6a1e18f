"""Images per second of the local backend and of Ray with 1 and 2 workers (docs/ray.md).

    python bench/ray_bench.py [--model models/synth_plain.onnx] [--images 40] [--json OUT]

The same analysis as ``naflow check`` (``naflow_onnx.check.run.CheckTask``: NAFlow, all layers,
the model's metadata preprocessing) over the same generated images (the synthetic benchmark's,
96x96), one torch/onnxruntime thread per worker, run by ``naflow_onnx.backends.run_tasks``:

* ``local``: this process, one image after the other;
* ``ray, N workers``: a local Ray instance started once (``ray.init(num_cpus=2)``; its start-up
  time is reported apart), N actors each loading the model once.

Per configuration: ``end_to_end`` = images / (seconds from the call to the last result, worker
start-up and model loading included), ``steady`` = (images - 1) / (seconds from the first result
to the last). Every flow is checked against the local backend's (identical maps). The machine's
load average is recorded: on a shared machine the numbers move with the neighbours' jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the local Ray instance talks over loopback only (Ray's switch for single-machine clusters)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def make_images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    from naflow_onnx.evaluate.synthetic import make_dataset
    ds = make_dataset(n, seed=0)
    paths = []
    for i, img in enumerate(ds["images"]):
        p = folder / f"{i:04d}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    return paths


def timed(task, items, **kw) -> dict:
    from naflow_onnx.backends import Failure, run_tasks
    t0 = time.perf_counter()
    stamps, flows = [], {}
    run = run_tasks(task, items, progress=False, **kw)
    for i, result in run:
        stamps.append(time.perf_counter() - t0)
        assert not isinstance(result, Failure), result
        status, flow = result
        assert status == "ok", flow
        flows[i] = flow
    n = len(items)
    return {"images": n, "workers": run.stats["workers"], "seconds": round(stamps[-1], 2),
            "first_result_s": round(stamps[0], 2),
            "end_to_end_images_per_s": round(n / stamps[-1], 3),
            "steady_images_per_s": round((n - 1) / (stamps[-1] - stamps[0]), 3),
            "_flows": flows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "synth_plain.onnx"))
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "ray_bench.json"))
    args = p.parse_args(argv)

    import numpy as np
    import torch
    torch.set_num_threads(1)
    import ray

    from naflow_onnx.check.run import CheckTask, Spec
    spec = Spec(model=str(Path(args.model).resolve()), preprocess=None, damp=None, provider="cpu",
                device="cpu", method="naflow", layers=None, threads=1)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        items = [(p, None) for p in make_images(Path(d), args.images)]
        load_before = os.getloadavg()
        rows["local"] = timed(CheckTask(spec), items, backend="local")
        t = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        ray_start = time.perf_counter() - t
        try:
            for w in (1, 2):
                rows[f"ray, {w} worker{'s' if w > 1 else ''}"] = timed(
                    CheckTask(spec), items, backend="ray", workers=w)
        finally:
            ray.shutdown()
        load_after = os.getloadavg()
    ref = rows["local"].pop("_flows")
    for name, row in rows.items():
        if name == "local":
            continue
        flows = row.pop("_flows")
        for i, flow in ref.items():
            assert flow.maps.keys() == flows[i].maps.keys()
            assert all(np.array_equal(flow.maps[k], flows[i].maps[k]) for k in flow.maps), (name, i)
        row["same_maps_as_local"] = True
    result = {"model": Path(args.model).name, "images": args.images, "image_size": 96,
              "ray_version": ray.__version__, "ray_start_s": round(ray_start, 2),
              "cpus": os.cpu_count(), "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in load_after], "runs": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.images} images of {result['model']} (96x96), {os.cpu_count()} CPUs, load "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f}; Ray start-up {ray_start:.1f} s (not counted)")
    print("| backend | images/s end to end | images/s steady | seconds | first result s |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['end_to_end_images_per_s']:.2f} | {r['steady_images_per_s']:.2f} | "
              f"{r['seconds']:.1f} | {r['first_result_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
