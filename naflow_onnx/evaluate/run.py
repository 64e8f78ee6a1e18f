"""``naflow evaluate``: per layer and method, how well each map localises and how faithful it is.

    naflow evaluate MODEL.onnx --out DIR [--dataset synthetic|photos|DATA.npz] [--n 200]
        [--methods naflow,reference,gradcam,layercam,gradxact] [--damps 0,0.01,...,inf]
        [--steps 20] [--randomise-images 20] [--randomise-steps 4] [--threads 1]

See docs/evaluation.md for the benchmark and ``report`` for the files written.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from ..errors import NAFlowError


def _floats(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(math.inf if part.lower() in ("inf", "infinity") else float(part))
        except ValueError:
            raise NAFlowError(f"--damps: '{part}' is not a number (or inf)") from None
        if out[-1] < 0:
            raise NAFlowError(f"--damps: {part} is negative")
    return out


def cascade_steps(K: int, steps: int) -> list[int]:
    """k values of the randomisation cascade: ``steps`` points from 1 (the top layer) to K (all)."""
    if K <= 0 or steps <= 0:
        return []
    if steps == 1:
        return [K]
    return sorted({max(1, round(1 + (K - 1) * i / (steps - 1))) for i in range(steps)})


def build_parser() -> argparse.ArgumentParser:
    from ..flow import DEFAULT_DAMP
    from ..methods import METHODS

    p = argparse.ArgumentParser(prog="naflow evaluate", description=(
        "Per layer and method: energy inside the object mask, pointing game, deletion and "
        "insertion AUC, and the model-parameter randomisation test (docs/evaluation.md)."))
    p.add_argument("model", help="the .onnx classifier")
    p.add_argument("--out", required=True, help="output folder: new, empty or an earlier naflow "
                   "output (replaced atomically); anything else is refused")
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic (generated, with masks; default), photos (skimage photos with "
                        "hand-drawn boxes), or a .npz written by evaluate.synthetic.save_dataset")
    p.add_argument("--n", type=int, help="number of images (synthetic default 200; others: all)")
    p.add_argument("--seed", type=int, default=3, help="synthetic data seed (default 3: disjoint "
                   "from the training and test seeds 1 and 2)")
    p.add_argument("--size", type=int, default=96, help="synthetic image size (default 96)")
    p.add_argument("--boxes", help="photo boxes JSON (default data/photo_boxes.json)")
    p.add_argument("--photos", help="comma-separated photo names from the boxes file (default all)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    p.add_argument("--damps", help="evaluate naflow at each of these dampings t (e.g. "
                   "0,0.01,0.03,0.1,0.3,1,inf) instead of the one --damp")
    p.add_argument("--damp", type=float, default=DEFAULT_DAMP, help=f"naflow damping (default {DEFAULT_DAMP})")
    p.add_argument("--tol", type=float, default=1e-4, help="solver tolerance (default 1e-4)")
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--layers", help="all (default), op:Conv,Relu, or a regex on tensor names")
    p.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    p.add_argument("--randomise-images", type=int, default=20,
                   help="images that get the randomisation test (the first N; default 20; 0 = off)")
    p.add_argument("--randomise-steps", type=int, default=4,
                   help="points of the top-down randomisation cascade, from the top layer to all "
                        "weight layers (default 4)")
    p.add_argument("--randomise-seed", type=int, default=0)
    p.add_argument("--preprocess", help="preprocessing preset (default: model metadata)")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads per worker (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--address", help="Ray cluster address (default: start a local instance)")
    p.add_argument("--workers", type=int, help="Ray workers (default: the cluster's CPUs)")
    p.add_argument("--json", action="store_true", help="print evaluation.json's summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


_WORKER_TASK = None


def _exit_with_parent(parent: int) -> None:
    """A killed `naflow evaluate` must not leave its workers computing on: each worker checks
    every second that its parent is still there."""
    import os
    import threading

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _worker_init(task, parent: int) -> None:
    global _WORKER_TASK
    _exit_with_parent(parent)
    task.setup()
    _WORKER_TASK = task


def _worker_run(index, item):
    from ..backends import Failure, one_line
    try:
        return _WORKER_TASK(item)
    except Exception as exc:  # noqa: BLE001 - the image fails, the run goes on
        return Failure(index, None, one_line(exc))


def _pool(task, items, args):
    """--jobs N: N local worker processes, each with the model loaded once."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm
    with ProcessPoolExecutor(args.jobs, mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(task, os.getpid())) as ex:
        futures = {ex.submit(_worker_run, i, item): i for i, item in enumerate(items)}
        with tqdm(total=len(items), desc="evaluate", unit="image", disable=True if args.quiet else None) as bar:
            for f in as_completed(futures):
                bar.update()
                yield futures[f], f.result()


def _iterate(task, items, args):
    """(index, result or Failure) over the items: --jobs N local processes, or run_tasks
    (in this process, or on Ray actors with --backend ray)."""
    from ..backends import run_tasks

    if args.backend == "local" and args.jobs > 1:
        yield from _pool(task, items, args)
        return
    if args.backend == "ray" and args.jobs > 1:
        raise NAFlowError("--jobs is for the local backend; with --backend ray give --workers")
    with run_tasks(task, items, backend=args.backend, address=args.address, workers=args.workers,
                   progress=not args.quiet, desc="evaluate") as run:
        yield from run


def evaluate(args) -> "Evaluation":  # noqa: F821
    from ..backends import Failure
    from ..graph import read_model
    from .datasets import load_items
    from .metrics import weight_bearing_nodes
    from .report import Evaluation
    from .task import EvaluationTask, variants_of
    from ..methods import METHODS

    import importlib.util
    if importlib.util.find_spec("scipy") is None:
        raise NAFlowError("naflow evaluate needs scipy: pip install 'naflow-onnx[evaluate]'")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise NAFlowError(f"--methods: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    damps = _floats(args.damps) if args.damps else None
    if damps and "naflow" not in methods:
        raise NAFlowError("--damps needs naflow among --methods")
    for name in ("steps", "randomise_images", "randomise_steps", "threads", "jobs"):
        if getattr(args, name) < (1 if name in ("steps", "threads", "jobs") else 0):
            raise NAFlowError(f"--{name.replace('_', '-')} must be positive")
    proto, path, sha = read_model(args.model)
    items, dataset = load_items(args.dataset, args.n, args.seed, args.size, args.boxes, args.photos)
    if not items:
        raise NAFlowError("the data set is empty")
    nodes = weight_bearing_nodes(proto)
    ks = cascade_steps(len(nodes), args.randomise_steps) if args.randomise_images else []
    cascade = [(k, nodes[k - 1][1]) for k in ks]
    analyzer_options = {"damp": args.damp, "tol": args.tol, "max_iter": args.max_iter,
                        "preprocess": args.preprocess}
    variants = variants_of(methods, damps)
    task = EvaluationTask(str(path), variants, analyzer_options, layers=args.layers, steps=args.steps,
                          randomise_images=min(args.randomise_images, len(items)) if ks else 0,
                          randomise_ks=ks, randomise_seed=args.randomise_seed, threads=args.threads)
    t0 = time.perf_counter()
    results, failures = [], []
    for i, res in _iterate(task, items, args):
        if isinstance(res, Failure):
            failures.append({"index": items[i].index, "name": items[i].name, "error": res.message})
        else:
            results.append(res)
    if not results:
        first = failures[0]["error"] if failures else "no result"
        raise NAFlowError(f"every image failed; the first: {first}")
    meta = {"model": {"path": str(path), "name": Path(path).name, "sha256": sha,
                      "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)},
            "dataset": dataset,
            "options": {"methods": methods, "damps": [("inf" if math.isinf(d) else d) for d in damps] if damps else None,
                        "damp": args.damp, "tol": args.tol, "max_iter": args.max_iter, "steps": args.steps,
                        "deletion_baseline": "mean colour", "insertion_baseline": "blur (sigma = max(H, W) / 24)",
                        "layers": args.layers or "all", "randomise_images": task.randomise_images,
                        "randomise_seed": args.randomise_seed, "threads": args.threads, "jobs": args.jobs,
                        "backend": args.backend},
            "wall_seconds": None}
    ev = Evaluation(results, variants, failures, meta, cascade)
    ev.meta["wall_seconds"] = time.perf_counter() - t0
    return ev


def _cmd_evaluate(args) -> int:
    from ..io import atomic_dir, check_output_dir

    check_output_dir(args.out)          # refused before the (long) evaluation, nothing touched
    ev = evaluate(args)
    with atomic_dir(args.out, "evaluate") as tmp:
        ev.write(tmp)
    if args.json:
        import json
        doc = ev.to_json()
        print(json.dumps({k: doc[k] for k in ("model", "dataset", "images", "stages", "solver")}, indent=1))
    else:
        print(f"{ev.meta['model']['name']}: {len(ev.results)} images, {len(ev.tensors)} layers, "
              f"{len(ev.failures)} failed, {ev.meta['wall_seconds']:.0f} s -> {args.out}")
        print(ev.markdown(["energy", "deletion"]))
    return 0


def main(argv=None) -> int:
    from ..errors import run_command
    return run_command(_cmd_evaluate, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
