"""Cold start: the one-call ``naflow_onnx.analyze`` in a fresh process against a warm Analyzer.

    python bench/cold_start.py [--models mobilenet-v2,resnet50] [--size 224] [--repeats 3]
                               [--warm-calls 3] [--threads 1] [--cache /tmp/naflow-bench]
                               [--out bench/results/cold_start.json]

Side by side in one run, each measurement in its own fresh subprocess, the rounds interleaved
(empty, cached, warm, empty, ...) so that all three see the same machine state:

  empty   ``naflow_onnx.analyze(model, image)`` with an empty model cache (NAFLOW_CACHE_DIR a new
          folder): what a first run on a machine costs
  cached  the same with the cache that an earlier run filled (naflow_onnx/cache.py)
  warm    ``Analyzer.analyze(image)`` on an Analyzer that already analysed the same image once
          (median of --warm-calls calls in one process; ``cache=False``)

Every round runs the three; the ratios are the medians over the rounds of each round's ratio
(robust to a load that drifts between rounds on a shared machine), for wall-clock time and for
the process's CPU time (``time.process_time``: with one thread, what contention does not
inflate). Times are of the call alone (imports are reported apart, ``import_s``: torch and onnxruntime
cost the same in every process and no cache removes them). Each process records where its time
went (``parts``: the graph check, onnxruntime session, rebuilt forward, plan, importance, the
σ power iterations and 1×1 pinv SVDs, the cache reads and writes, the rest of the
back-projection); ``rest`` is what no part names (image loading, maps, first-call warm-up).
torch threads = onnxruntime intra-op threads = --threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from perf import ROOT, MARK, export_model, loadavg, photos, run_task  # noqa: E402

KINDS = ("empty", "cached", "warm")
# (module, attribute, part name): the timed pieces of one call
PARTS = (("naflow_onnx.graph", "read_model", "read_model"),
         ("naflow_onnx.graph", "check_and_infer", "checker+shape_inference"),
         ("naflow_onnx.cache", "load_checked", "cache_read_graph"),
         ("naflow_onnx.cache", "save_checked", "cache_write_graph"),
         ("naflow_onnx.cache", "load_solver_memo", "cache_read_solver"),
         ("naflow_onnx.cache", "save_solver_memo", "cache_write_solver"),
         ("naflow_onnx.flow", "Capture", "ort_session"),
         ("naflow_onnx.flow", "run_graph", "rebuilt_forward"),
         ("naflow_onnx.flow", "plan", "plan"),
         ("naflow_onnx.flow", "importance", "importance"),
         ("naflow_onnx.rules.solver", "spectral_norm", "sigma_power_iteration"),
         ("naflow_onnx.rules.affine", "pointwise_pinv", "pinv_svd"),
         ("naflow_onnx.flow", "backproject", "backproject"))


def _instrument(parts: dict) -> None:
    """Wrap every PARTS function to add its wall time to ``parts`` (nested calls are counted in
    their own part and in the enclosing one: backproject holds σ and pinv)."""
    import importlib
    for module, attr, name in PARTS:
        mod = importlib.import_module(module)
        fn = getattr(mod, attr)

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                parts[_name] = parts.get(_name, 0.0) + time.perf_counter() - t0
        setattr(mod, attr, timed)


def worker(task: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    import onnxruntime as ort
    import naflow_onnx as nf
    from naflow_onnx import capture, flow as flow_mod
    import_s = time.perf_counter() - t0
    torch.set_num_threads(task["threads"])
    threads = task["threads"]

    class Options(ort.SessionOptions):      # the one-call API takes no thread count
        def __init__(self):
            super().__init__()
            self.intra_op_num_threads = threads
    capture.ort.SessionOptions = Options
    parts: dict[str, float] = {}
    _instrument(parts)
    options = dict(provider="cpu", device="cpu", preprocess=task["preprocess"])
    options = {k: v for k, v in options.items() if v is not None}
    image = task["image"]
    if task["kind"] == "warm":
        analyzer = flow_mod.Analyzer(task["model"], cache=False, **options)
        analyzer.analyze(image)
        times, cpu = [], []
        for _ in range(task["calls"]):
            parts.clear()
            t, c = time.perf_counter(), time.process_time()
            flow = analyzer.analyze(image)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    else:
        os.environ["NAFLOW_CACHE_DIR"] = task["cache_dir"]
        t, c = time.perf_counter(), time.process_time()
        flow = nf.analyze(task["model"], image, **options)
        times, cpu = [time.perf_counter() - t], [time.process_time() - c]
    seconds = statistics.median(times)
    named = sum(v for k, v in parts.items() if k not in ("sigma_power_iteration", "pinv_svd"))
    return {"kind": task["kind"], "seconds": seconds, "times": times,
            "cpu_seconds": statistics.median(cpu), "cpu_times": cpu, "import_s": import_s,
            "parts": {**{k: round(v, 4) for k, v in parts.items()},
                      "rest": round(times[-1] - named, 4)},
            "all_converged": flow.solver_summary()["all_converged"],
            "layers": len(flow.layers)}


def measure(name: str, size: int, args, workdir: Path) -> dict:
    model, preprocess, skip = export_model(name, size, Path(args.cache))
    if skip:
        return {"model": name, "size": size, "skipped": skip}
    image = photos(1, Path(args.cache))[0]
    base = {"model": model, "preprocess": preprocess, "image": image, "threads": args.threads,
            "calls": args.warm_calls}
    filled = workdir / f"{name}-filled"
    filled.mkdir()
    first = run_task({**base, "kind": "empty", "cache_dir": str(filled)}, args.timeout, Path(__file__))
    if "error" in first:
        return {"model": name, "size": size, "error": first["error"]}
    runs = {k: [] for k in KINDS}
    for i in range(args.repeats):
        empty = workdir / f"{name}-empty-{i}"
        empty.mkdir()
        for kind in KINDS:
            task = {**base, "kind": kind, "cache_dir": str(empty if kind == "empty" else filled)}
            out = run_task(task, args.timeout, Path(__file__))
            if "error" in out:
                return {"model": name, "size": size, "error": f"{kind}: {out['error']}"}
            runs[kind].append(out)
            print(f"  {name} {kind}: {out['seconds']:.3f} s", flush=True)
    def ratio(kind, key):
        return round(statistics.median(runs[kind][i][key] / runs["warm"][i][key]
                                       for i in range(args.repeats)), 3)
    med = {k: statistics.median(r["seconds"] for r in runs[k]) for k in KINDS}
    cpu = {k: statistics.median(r["cpu_seconds"] for r in runs[k]) for k in KINDS}
    cache_bytes = sum(p.stat().st_size for p in filled.iterdir())
    return {"model": name, "size": size, "seconds": {k: round(v, 4) for k, v in med.items()},
            "cpu_seconds": {k: round(v, 4) for k, v in cpu.items()},
            "ratio_empty": ratio("empty", "seconds"), "ratio_cached": ratio("cached", "seconds"),
            "cpu_ratio_empty": ratio("empty", "cpu_seconds"),
            "cpu_ratio_cached": ratio("cached", "cpu_seconds"),
            "import_s": round(statistics.median(r["import_s"] for k in KINDS for r in runs[k]), 3),
            "cache_bytes": cache_bytes, "runs": runs,
            "all_converged": all(r["all_converged"] for k in KINDS for r in runs[k])}


def table(entries: list[dict]) -> str:
    lines = ["| model | one-call, empty cache (s) | one-call, cached (s) | warm Analyzer (s) | "
             "empty / warm | cached / warm | CPU: empty / warm | CPU: cached / warm | cache size |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in entries:
        if "seconds" not in e:
            lines.append(f"| {e['model']} {e['size']} | {e.get('skipped') or e.get('error')} |||||||")
            continue
        s = e["seconds"]
        lines.append(f"| {e['model']} {e['size']} | {s['empty']:.3f} | {s['cached']:.3f} | "
                     f"{s['warm']:.3f} | {e['ratio_empty']:.2f} | {e['ratio_cached']:.2f} | "
                     f"{e['cpu_ratio_empty']:.2f} | {e['cpu_ratio_cached']:.2f} | "
                     f"{e['cache_bytes'] / 1e6:.1f} MB |")
    return "\n".join(lines)


def parts_table(entries: list[dict]) -> str:
    """Median seconds per part and kind (the parts of the first process of each kind)."""
    names = [p[2] for p in PARTS] + ["rest"]
    out = []
    for e in entries:
        if "runs" not in e:
            continue
        out += [f"{e['model']} {e['size']}:", "| part | " + " | ".join(KINDS) + " |",
                "| --- |" + " ---: |" * len(KINDS)]
        for n in names:
            vals = [statistics.median(r["parts"].get(n, 0.0) for r in e["runs"][k]) for k in KINDS]
            if any(vals):
                out.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet-v2,resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (fresh processes of each kind)")
    ap.add_argument("--warm-calls", type=int, default=3, help="timed calls per warm process")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/naflow-bench", help="where models are exported once")
    ap.add_argument("--out", default=str(HERE / "results" / "cold_start.json"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    entries = []
    with tempfile.TemporaryDirectory(prefix="naflow-cold-") as d:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            entries.append(measure(name, args.size, args, Path(d)))
    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": args.threads, "repeats": args.repeats,
            "warm_calls": args.warm_calls,
            "loadavg": loadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "entries": entries}, indent=1) + "\n")
    print(table(entries))
    print()
    print(parts_table(entries))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
