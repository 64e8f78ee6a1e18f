"""Families bench: for each CNN family of tests/families.py (issue 13), NAFlow time against the
cost of one forward + backward pass, and whether the family passes issue 13's checks today.

    python bench/families.py [--families densenet121,convnext,...] [--repeats 3] [--threads 1]
                             [--out bench/results/families.json] [--cache /tmp/naflow-families]

For every family, side by side in one run (each timing in its own fresh subprocess, as
bench/perf.py does, whose workers, timer and subprocess runner are reused here):

  torch_fb   the plain-torch re-implementation itself: forward + backward of the top logit to the
             input (parameters frozen, so only activation gradients are computed, as Grad-CAM needs)
  fb         bench/perf.py's F+B: the same on naflow's torch rebuild of the exported ONNX graph
  naflow     bench/perf.py's naflow: Analyzer.analyze(image, method="naflow"), the full flow
  check      (in this process, untimed) the analysis with tensors kept, then
             tests/families.acceptance + verdict: coverage of spatial data-path convs, final
             tensor == features(x), parity, convergence; or the one-line error that stopped it

Ratios: NAFlow / torch F+B and NAFlow / rebuilt F+B, wall-clock medians (and process CPU time,
which is the uncontended time at --threads 1 on a shared machine). The input is scikit-image's
chelsea photo resized to the family's input size, "none" preprocessing, random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import perf  # noqa: E402  (bench/perf.py: Timer, _repeat, worker, run_task, photos, fmt, loadavg)

SCHEMA = "naflow-onnx/families-bench"


def family_lib():
    """tests/families.py (this script's own name shadows ``import families``)."""
    name = "naflow_test_families"
    if name not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "families.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:400]}"


def torch_fb_worker(task: dict) -> dict:
    """F+B of the family's own torch net on the image the Analyzer feeds the ONNX model (built
    here from the family's size, so that it runs also where naflow refuses the ONNX file)."""
    import torch
    families = family_lib()
    from naflow_onnx import preprocess as pp_mod
    torch.set_num_threads(task["threads"])
    size = families.FAMILIES[task["family"]].size      # the export's "none" preprocessing
    pre = pp_mod.resolve([1, 3, size, size], {}, "none")
    view, _ = pp_mod.load_image(task["images"][0], pre.size)
    x = torch.from_numpy(pre.to_input(view))
    model = families.build(task["family"])
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        index = int(model(x)[0].argmax())

    def fb():
        xi = x.clone().requires_grad_(True)
        model(xi)[0, index].backward()
        return xi.grad

    res = {"kind": "torch_fb", "loadavg_start": perf.loadavg()}
    res.update(perf._repeat(perf.Timer(False), fb, task["repeats"]))
    res["loadavg_end"] = perf.loadavg()
    return res


def check(name: str, path: Path, image: str) -> dict:
    """Issue 13's verdict for one exported family (untimed): {"status", "problems", facts...}."""
    import naflow_onnx as nf
    families = family_lib()
    model = families.build(name)
    try:
        an = nf.Analyzer(path, parity_tol=1e-4, device="cpu")
        facts = families.acceptance(model, path, an, an.analyze(image, keep_tensors=True))
    except Exception as exc:  # noqa: BLE001 - this is what the bench records
        return {"status": "error", "error": one_line(exc)}
    problems = families.verdict(facts)
    return {"status": "fail" if problems else "pass", "problems": problems,
            "convs": len(facts["convs"]), "mapped": len(facts["mapped"]), "final": facts["final"],
            "final_error": facts["final_error"], "parity": facts["parity"], "solved": facts["solved"]}


def summarise(entry: dict) -> dict:
    m = entry["measurements"]

    def get(kind, key="median_ms"):
        return (m.get(kind) or {}).get(key)
    row = {k: get(k) for k in ("torch_fb", "fb", "naflow")}
    row.update({f"{k}_cpu": get(k, "cpu_median_ms") for k in ("torch_fb", "fb", "naflow")})
    for base in ("torch_fb", "fb"):
        row[f"naflow_over_{base}"] = row["naflow"] / row[base] if row["naflow"] and row[base] else None
        nc, bc = row["naflow_cpu"], row[f"{base}_cpu"]
        row[f"naflow_over_{base}_cpu"] = nc / bc if nc and bc else None
    solver = (m.get("naflow") or {}).get("solver") or {}
    row["cgls_iterations"] = solver.get("cgls_iterations")
    row["layers"] = (m.get("naflow") or {}).get("layers")
    return row


def table(entries: list[dict]) -> str:
    head = ("| family | size | today | layers | convs mapped | torch F+B ms (CPU) | rebuilt F+B ms (CPU) | "
            "NAFlow ms (CPU) | NAFlow / torch F+B (CPU) | NAFlow / rebuilt F+B (CPU) | CGLS iters |")
    lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
    fmt = perf.fmt
    for e in entries:
        s, c = e["summary"], e["check"]
        cov = f"{c['mapped']}/{c['convs']}" if "convs" in c else "-"
        lines.append(
            f"| {e['family']} | {e['size']} | {c['status']} | {fmt(s['layers'], 'd')} | {cov} | "
            f"{fmt(s['torch_fb'], '.1f')} ({fmt(s['torch_fb_cpu'], '.1f')}) | "
            f"{fmt(s['fb'], '.1f')} ({fmt(s['fb_cpu'], '.1f')}) | {fmt(s['naflow'])} ({fmt(s['naflow_cpu'])}) | "
            f"{fmt(s['naflow_over_torch_fb'], '.1f')} ({fmt(s['naflow_over_torch_fb_cpu'], '.1f')}) | "
            f"{fmt(s['naflow_over_fb'], '.1f')} ({fmt(s['naflow_over_fb_cpu'], '.1f')}) | "
            f"{fmt(s['cgls_iterations'], 'd')} |")
    return "\n".join(lines)


def failures(entries: list[dict]) -> list[str]:
    out = []
    for e in entries:
        c = e["check"]
        if c["status"] == "error":
            out.append(f"{e['family']}: {c['error']}")
        elif c["status"] == "fail":
            out.append(f"{e['family']}: " + "; ".join(c["problems"]))
    return out


def write(out_path: Path, meta: dict, entries: list, complete: bool) -> None:
    meta = dict(meta, complete=complete, loadavg_end=perf.loadavg())
    doc = {"schema": SCHEMA, "meta": meta, "results": entries, "failing": failures(entries)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", help="comma list (default: all of tests/families.py)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "families.json"))
    ap.add_argument("--cache", default="/tmp/naflow-families", help="exported models (rewritten each run)")
    ap.add_argument("--timeout", type=float, default=900, help="per-measurement subprocess limit, s")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        res = torch_fb_worker(task) if task["kind"] == "torch_fb" else perf.worker(task)
        print(perf.MARK + json.dumps(res), flush=True)
        return 0

    import onnxruntime
    import torch
    families = family_lib()
    names = [n.strip() for n in args.families.split(",")] if args.families else list(families.FAMILIES)
    unknown = [n for n in names if n not in families.FAMILIES]
    if unknown:
        print(f"families.py: error: unknown famil{'y' if len(unknown) == 1 else 'ies'} "
              f"{', '.join(unknown)} (choose from {', '.join(families.FAMILIES)})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    image = perf.photos(1)[0]
    meta = {"command": " ".join(["bench/families.py"] + (argv if argv is not None else sys.argv[1:])),
            "families": names, "repeats": args.repeats, "threads": args.threads, "image": image,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "loadavg_start": perf.loadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out_path = Path(args.out)
    entries = []
    t0 = time.perf_counter()
    print(f"families bench: {len(names)} families, repeats {args.repeats}, threads {args.threads}, "
          f"load average {meta['loadavg_start']}", flush=True)
    for name in names:
        size = families.FAMILIES[name].size
        entry = {"family": name, "size": size, "measurements": {}}
        try:
            _, path = families.export_family(name, cache)
        except Exception as exc:  # noqa: BLE001 - recorded
            traceback.print_exc()
            entry.update(check={"status": "error", "error": "export: " + one_line(exc)}, summary=summarise(entry))
            entries.append(entry)
            continue
        entry["path"] = str(path)
        entry["check"] = check(name, path, image)
        task = {"model": str(path), "preprocess": None, "device": "cpu", "provider": "cpu",
                "threads": args.threads, "repeats": args.repeats, "batch": 0, "images": [image],
                "family": name}
        for kind, script in (("torch_fb", Path(__file__).resolve()), ("fb", None), ("naflow", None)):
            r = perf.run_task(dict(task, kind=kind), args.timeout, script)
            entry["measurements"][kind] = r
        entry["summary"] = s = summarise(entry)
        entries.append(entry)
        c = entry["check"]
        print(f"  {name:<22} {c['status']:<5} torch F+B {perf.fmt(s['torch_fb'], '.1f')} ms, NAFlow "
              f"{perf.fmt(s['naflow'])} ms, ratio {perf.fmt(s['naflow_over_torch_fb'], '.1f')} "
              f"(CPU {perf.fmt(s['naflow_over_torch_fb_cpu'], '.1f')})"
              + (f"  [{c.get('error') or '; '.join(c['problems'])}]" if c["status"] != "pass" else ""),
              flush=True)
        write(out_path, meta, entries, complete=False)
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write(out_path, meta, entries, complete=True)
    print()
    print(table(entries))
    print()
    passing = sum(e["check"]["status"] == "pass" for e in entries)
    print(f"{passing}/{len(entries)} families pass issue 13's checks; failing:")
    for line in failures(entries):
        print(f"  {line}")
    print(f"threads {args.threads}, load average start {meta['loadavg_start']} end {perf.loadavg()}, "
          f"{meta['elapsed_s']:.0f} s; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
