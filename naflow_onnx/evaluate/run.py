"""The evaluation benchmark as a library: per layer and method, how well each map localises and
how faithful it is (docs/evaluation.md; the command is ``evaluate.cli``).

    from naflow_onnx.evaluate import EvaluateOptions, run
    ev = run("model.onnx", EvaluateOptions(n=50, methods=("naflow", "gradcam")))
    ev.write("out/")          # evaluation.json, metrics.csv, per_image.npz, ... (``report``)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..backends import DEFAULT_BATCH, resolve_batch
from ..errors import NAFlowError
from ..methods import METHODS


@dataclass
class EvaluateOptions:
    """What ``run`` evaluates and how. The data: ``dataset`` (synthetic, photos, or a .npz from
    ``evaluate.synthetic.save_dataset``), ``n`` images (synthetic default 200; others: all),
    ``seed`` and ``size`` of synthetic images, ``boxes`` / ``photos`` of the photo set. The maps:
    ``methods``, naflow at ``damp`` or at each of ``damps``, ``tol``, ``max_iter``, ``layers``,
    ``preprocess``. The metrics: deletion/insertion ``steps``; the randomisation test on the
    first ``randomise_images`` images at ``randomise_steps`` points of the cascade. Where it
    runs: ``threads`` per worker, ``jobs`` local processes or ``backend="ray"``; ``batch`` images
    prepared and back-projected together (1 = one by one); ``cache``: read and write the model
    cache (README "Cache")."""

    dataset: str = "synthetic"
    n: int | None = None
    seed: int = 3
    size: int = 96
    boxes: str | None = None
    photos: str | None = None
    methods: tuple[str, ...] = METHODS
    damps: tuple[float, ...] | None = None
    damp: float | None = None            # None: the analyzer's default (DEFAULT_DAMP)
    tol: float = 1e-4
    max_iter: int = 2000
    layers: str | None = None
    steps: int = 20
    randomise_images: int = 20
    randomise_steps: int = 4
    randomise_seed: int = 0
    preprocess: str | None = None
    threads: int = 1
    jobs: int = 1
    backend: str = "local"
    address: str | None = None
    workers: int | None = None
    quiet: bool = True
    batch: int | None = DEFAULT_BATCH       # None: backends.resolve_batch
    cache: bool = True



def cascade_steps(K: int, steps: int) -> list[int]:
    """k values of the randomisation cascade: ``steps`` points from 1 (the top layer) to K (all)."""
    if K <= 0 or steps <= 0:
        return []
    if steps == 1:
        return [K]
    return sorted({max(1, round(1 + (K - 1) * i / (steps - 1))) for i in range(steps)})


def _iterate(task, items, opts):
    """(index, result or Failure) over the items (naflow_onnx.backends.run_tasks): in this
    process, in --jobs N local worker processes, or on Ray actors with --backend ray."""
    from ..backends import run_tasks

    if opts.backend == "ray" and opts.jobs > 1:
        raise NAFlowError("--jobs is for the local backend; with --backend ray give --workers")
    backend, workers = opts.backend, opts.workers
    if backend == "local" and opts.jobs > 1:
        backend, workers = "processes", opts.jobs
    with run_tasks(task, items, backend=backend, address=opts.address, workers=workers,
                   progress=not opts.quiet, desc="evaluate",
                   batch=resolve_batch(opts.batch)) as results:
        yield from results


def run(model, options: EvaluateOptions | None = None) -> "Evaluation":  # noqa: F821
    """Evaluate ``model`` (an .onnx classifier) on ``options.dataset``; returns the
    ``report.Evaluation`` (``write(folder)``, ``to_json()``, ``markdown()``). Bad options, an
    empty data set or every image failing raise NAFlowError."""
    from ..backends import Failure
    from ..graph import read_model
    from .datasets import load_items
    from ..randomise import weight_bearing_nodes
    from .report import Evaluation
    from .task import EvaluationTask, variants_of

    import importlib.util
    if importlib.util.find_spec("scipy") is None:
        raise NAFlowError("naflow evaluate needs scipy: pip install 'naflow-onnx[evaluate]'")
    from ..backends import check_batch
    from ..rules.solver import DEFAULT_DAMP
    opts = options or EvaluateOptions()
    check_batch(opts.batch)
    damp = DEFAULT_DAMP if opts.damp is None else float(opts.damp)
    methods = list(opts.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise NAFlowError(f"--methods: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    damps = list(opts.damps) if opts.damps else None
    if damps and any(not d >= 0 for d in damps):
        raise NAFlowError(f"--damps: {next(d for d in damps if not d >= 0)} is negative")
    if damps and "naflow" not in methods:
        raise NAFlowError("--damps needs naflow among --methods")
    for name in ("steps", "randomise_images", "randomise_steps", "threads", "jobs"):
        if getattr(opts, name) < (1 if name in ("steps", "threads", "jobs") else 0):
            raise NAFlowError(f"--{name.replace('_', '-')} must be positive")
    proto, path, sha = read_model(model)
    items, dataset = load_items(opts.dataset, opts.n, opts.seed, opts.size, opts.boxes, opts.photos)
    if not items:
        raise NAFlowError("the data set is empty")
    nodes = weight_bearing_nodes(proto)
    ks = cascade_steps(len(nodes), opts.randomise_steps) if opts.randomise_images else []
    cascade = [(k, nodes[k - 1][1]) for k in ks]
    analyzer_options = {"damp": damp, "tol": opts.tol, "max_iter": opts.max_iter,
                        "preprocess": opts.preprocess, "cache": opts.cache}
    variants = variants_of(methods, damps)
    task = EvaluationTask(str(path), variants, analyzer_options, layers=opts.layers, steps=opts.steps,
                          randomise_images=min(opts.randomise_images, len(items)) if ks else 0,
                          randomise_ks=ks, randomise_seed=opts.randomise_seed, threads=opts.threads)
    t0 = time.perf_counter()
    results, failures = [], []
    for i, res in _iterate(task, items, opts):
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
                        "damp": damp, "tol": opts.tol, "max_iter": opts.max_iter, "steps": opts.steps,
                        "deletion_baseline": "mean colour", "insertion_baseline": "blur (sigma = max(H, W) / 24)",
                        "layers": opts.layers or "all", "randomise_images": task.randomise_images,
                        "randomise_seed": opts.randomise_seed, "threads": opts.threads, "jobs": opts.jobs,
                        "backend": opts.backend},
            "wall_seconds": None}
    ev = Evaluation(results, variants, failures, meta, cascade)
    ev.meta["wall_seconds"] = time.perf_counter() - t0
    return ev


