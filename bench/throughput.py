"""Issue 17's throughput goals, measured side by side in one run (CPU, 1 thread, 224×224).

For each model, one fresh process (``--baseline DIR``: a second one with that checkout's
``naflow_onnx``, for before/after) measures, on the same photos:

- ``fb``: forward + backward of the model's top-1 logit in plain torch (the model the ONNX file
  was exported from, not naflow's rebuild): the F+B every ratio divides by;
- ``warm``: ``Analyzer.analyze(image)`` after a warm-up (median of ``--repeats``);
- ``one_by_one``: ``analyze`` of ``--images`` photos in turn: images/s;
- ``batched``: ``Analyzer.analyze_many(photos, batch=--batch)``: images/s, and the largest
  difference to the one-by-one maps (relative to each map's range);
- ``memory``: the peak of live memory during F+B and during ``analyze``, each from its own
  reset of the kernel's high-water mark, with glibc's mmap threshold at 64 KiB so that freed
  tensors leave the resident set (else the allocator keeps them and the figures measure its
  history, not the analysis).

Times are CPU seconds of the measuring process (1 thread: its wall time on an idle machine;
a shared machine's load does not inflate them). The one-call ``naflow_onnx.analyze()`` against a
warm Analyzer (a fresh process each) is ``bench/cold_start.py``'s.

    python bench/throughput.py                         # mobilenet-v2 and resnet50 at 224
    python bench/throughput.py --baseline /tmp/naflow-base --out bench/results/throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

GOALS = {"mobilenet-v2": 4.0, "resnet50": 6.0}       # warm NAFlow / (F+B)


def _hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak(fn) -> tuple[float, object]:
    """Peak growth of the resident set over its size before ``fn`` (MB), and fn's result."""
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")                 # reset the high-water mark
    base = _rss_mb()
    out = fn()
    return _hwm_mb() - base, out


def _clock(cuda: bool):
    """CPU seconds of this process on the CPU; wall seconds after a CUDA sync on a GPU."""
    if not cuda:
        return time.process_time()
    import torch
    torch.cuda.synchronize()
    return time.perf_counter()


def _cpu(fn, repeats: int, cuda: bool = False) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one untimed call)."""
    out = fn()
    times = []
    for _ in range(repeats):
        c0 = _clock(cuda)
        out = fn()
        times.append(_clock(cuda) - c0)
    times.sort()
    return times[len(times) // 2], out


def worker(task: dict) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(task.get("threads", 1))
    import naflow_onnx as nf
    from models import registry
    from perf import photos

    device = task.get("device", "cpu")
    cuda = device == "cuda"
    images = photos(task["images"])
    out = {"naflow_onnx": str(Path(nf.__file__).parent), "device": device}
    model, _ = registry.get_model(task["model"])
    model.eval().to(device)
    an = nf.Analyzer(task["path"], provider="cpu", device=device)
    from naflow_onnx.capture import Capture
    # onnxruntime's own pool (all cores, spinning) would add CPU time no torch thread spends
    an.capture = Capture(an.graph.model, "cpu", threads=task.get("threads", 1))
    x = torch.from_numpy(an.preprocess.to_input(
        nf.preprocess.load_image(images[0], an.preprocess.size)[0])).to(device)

    def fb():
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y = y[0] if isinstance(y, (tuple, list)) else y
        y.reshape(1, -1)[0, int(y.reshape(1, -1)[0].argmax())].backward()
    an.analyze(images[1])                                   # warm-up: plans, memo, oneDNN
    if task["mode"] == "memory":
        fb()
        out["peak_fb_mb"], _ = _peak(fb)
        out["peak_analyze_mb"], _ = _peak(lambda: an.analyze(images[0]))
        if hasattr(an, "analyze_many") and task["batch"] > 1:
            an.analyze_many(images[:2], batch=2)
            out["peak_batched_mb"], _ = _peak(lambda: an.analyze_many(images, batch=task["batch"]))
        return out
    out["fb_s"], _ = _cpu(fb, max(5, task["repeats"]), cuda)
    out["warm_s"], flow = _cpu(lambda: an.analyze(images[0]), task["repeats"], cuda)
    recs = [la.solver for la in flow.layers if la.solver]
    out["warm_cgls_iterations"] = sum(r.get("iterations", 0) for r in recs)
    out["warm_all_converged"] = all(r.get("converged", True) for r in recs)
    out["warm_max_convergence"] = max((r.get("convergence") or 0.0) for r in recs)
    c0 = _clock(cuda)
    alone = [an.analyze(im) for im in images]
    out["one_by_one_images_per_s"] = len(images) / (_clock(cuda) - c0)
    if hasattr(an, "analyze_many") and task["batch"] > 1:
        an.analyze_many(images[:task["batch"]], batch=task["batch"])    # this batch size's plan
        c0 = _clock(cuda)
        many = an.analyze_many(images, batch=task["batch"])
        out["batched_images_per_s"] = len(images) / (_clock(cuda) - c0)
        out["batch_used"] = many[0].options.get("batch")
        worst = 0.0
        for a, b in zip(alone, many):
            for t, m in a.maps.items():
                span = float(m.max() - m.min()) or 1.0
                worst = max(worst, float(np.abs(b.maps[t] - m).max()) / span)
        out["batched_max_map_difference"] = worst
        out["batched_all_converged"] = all(
            la.solver.get("converged", True) for f in many for la in f.layers if la.solver)
    return out


def run_worker(task: dict, code_root: Path) -> dict:
    """The timing process, then the memory process (glibc's mmap threshold lowered: it slows
    every allocation, so times are never taken there)."""
    out = {}
    for mode in ("time", "memory") if task.get("device", "cpu") == "cpu" else ("time",):
        threads = str(task.get("threads", 1))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join([str(code_root), str(ROOT), str(ROOT / "bench")])}
        if mode == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        proc = subprocess.run([sys.executable, __file__, "--worker",
                               json.dumps({**task, "mode": mode})], env=env,
                              capture_output=True, text=True, timeout=task.get("timeout", 3600))
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            return {"error": f"{mode}: {err[-1] if err else 'failed'}"}
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def summary(name: str, r: dict, b: dict | None) -> dict:
    row = {"model": name, "fb_ms": r["fb_s"] * 1e3, "warm_ms": r["warm_s"] * 1e3,
           "warm_over_fb": r["warm_s"] / r["fb_s"], "goal_warm_over_fb": GOALS.get(name),
           "one_by_one_images_per_s": r["one_by_one_images_per_s"],
           "batched_images_per_s": r.get("batched_images_per_s"),
           "batched_over_one_by_one": (r["batched_images_per_s"] / r["one_by_one_images_per_s"]
                                       if r.get("batched_images_per_s") else None),
           "peak_analyze_over_fb": (r["peak_analyze_mb"] / r["peak_fb_mb"]
                                    if "peak_fb_mb" in r else None),
           "all_converged": r["warm_all_converged"] and r.get("batched_all_converged", True)}
    if b and "error" not in b:
        # both processes time the same torch F+B: the smaller figure (the less disturbed one)
        # divides both NAFlow times
        fb = min(r["fb_s"], b["fb_s"])
        row["fb_ms"], row["warm_over_fb"] = fb * 1e3, r["warm_s"] / fb
        row["before_warm_ms"] = b["warm_s"] * 1e3
        row["before_warm_over_fb"] = b["warm_s"] / fb
        if "peak_fb_mb" in b:
            row["before_peak_analyze_over_fb"] = b["peak_analyze_mb"] / b["peak_fb_mb"]
    return row


def table(rows: list[dict]) -> str:
    def f(v, spec=".1f"):
        return "–" if v is None else format(v, spec)
    lines = ["| model | F+B ms | warm NAFlow ms (before) | warm / F+B (before; goal) | "
             "images/s one by one | images/s batched | batched / one by one (goal 3) | "
             "peak analyze / F+B (before; goal 3) | all converged |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {f(r['fb_ms'])} | {f(r['warm_ms'], '.0f')} "
            f"({f(r.get('before_warm_ms'), '.0f')}) | {f(r['warm_over_fb'])} "
            f"({f(r.get('before_warm_over_fb'))}; ≤ {f(r['goal_warm_over_fb'], '.0f')}) | "
            f"{f(r['one_by_one_images_per_s'], '.2f')} | {f(r['batched_images_per_s'], '.2f')} | "
            f"{f(r['batched_over_one_by_one'], '.2f')} | {f(r['peak_analyze_over_fb'], '.2f')} "
            f"({f(r.get('before_peak_analyze_over_fb'), '.2f')}) | {r['all_converged']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mobilenet-v2,resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (CPU seconds) or cuda (wall seconds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/naflow-bench", help="exported models (made once)")
    ap.add_argument("--baseline", metavar="DIR", help="another checkout, measured right after")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from perf import export_model
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    for name in args.models.split(","):
        path, _, skip = export_model(name, args.size, cache)
        if skip:
            print(f"{name}: skipped ({skip})")
            continue
        task = {"model": name, "path": path, "images": args.images, "batch": args.batch,
                "repeats": args.repeats, "device": args.device, "threads": args.threads}
        print(f"{name}: measuring ...", flush=True)
        after = run_worker(task, ROOT)
        before = run_worker({**task, "batch": 1}, Path(args.baseline)) if args.baseline else None
        raw[name] = {"after": after, "before": before}
        if "error" in after:
            print(f"{name}: {after['error']}")
            continue
        rows.append(summary(name, after, before))
    print(table(rows))
    doc = {"schema": "naflow-onnx/bench-throughput", "threads": args.threads,
           "device": args.device, "size": args.size,
           "images": args.images, "batch": args.batch, "repeats": args.repeats,
           "baseline": args.baseline, "load_average": list(os.getloadavg()),
           "rows": rows, "raw": raw}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
