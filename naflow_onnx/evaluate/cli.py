"""``naflow evaluate`` on the command line (the work is ``evaluate.run``), and the benchmark's
helper commands ``python -m naflow_onnx.evaluate.train`` / ``.compare`` (``train_main``,
``compare_main``).

    naflow evaluate MODEL.onnx --out DIR [--dataset synthetic|photos|DATA.npz] [--n 200]
        [--methods naflow,reference,gradcam,layercam,gradxact] [--damps 0,0.01,...,inf]
        [--steps 20] [--randomise-images 20] [--randomise-steps 4] [--threads 1]

See docs/evaluation.md for the benchmark and ``report`` for the files written.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import NAFlowError
from ..methods import METHODS
from .run import EvaluateOptions, run


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


def build_parser() -> argparse.ArgumentParser:
    from ..backends import BACKENDS, DEFAULT_BATCH, GPU_BATCH
    from ..rules.solver import DEFAULT_DAMP

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
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the model cache")
    p.add_argument("--backend", choices=BACKENDS, default="local")
    p.add_argument("--address", help="Ray cluster address (default: start a local instance)")
    p.add_argument("--workers", type=int, help="worker processes or Ray actors (default: the CPUs)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"images prepared and back-projected together (default {GPU_BATCH} when "
                        "torch runs on a GPU, 1 on a CPU; scores do not depend on it beyond the "
                        "solver tolerance)")
    p.add_argument("--json", action="store_true", help="print evaluation.json's summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def options_from(args) -> EvaluateOptions:
    """The library options of the command's arguments."""
    return EvaluateOptions(
        dataset=args.dataset, n=args.n, seed=args.seed, size=args.size, boxes=args.boxes,
        photos=args.photos, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        damps=tuple(_floats(args.damps)) if args.damps else None, damp=args.damp, tol=args.tol,
        max_iter=args.max_iter, layers=args.layers, steps=args.steps,
        randomise_images=args.randomise_images, randomise_steps=args.randomise_steps,
        randomise_seed=args.randomise_seed, preprocess=args.preprocess, threads=args.threads,
        jobs=args.jobs, backend=args.backend, address=args.address, workers=args.workers,
        quiet=args.quiet, batch=args.batch, cache=not args.no_cache)


def _cmd_evaluate(args) -> int:
    from ..io import atomic_dir, check_output_dir

    check_output_dir(args.out)          # refused before the (long) evaluation, nothing touched
    ev = run(args.model, options_from(args))
    with atomic_dir(args.out, "evaluate") as tmp:
        ev.write(tmp)
    if args.json:
        doc = ev.to_json()
        print(json.dumps({k: doc[k] for k in ("model", "dataset", "images", "stages", "solver")}, indent=1,
                         allow_nan=False))
    else:
        print(f"{ev.meta['model']['name']}: {len(ev.results)} images, {len(ev.tensors)} layers, "
              f"{len(ev.failures)} failed, {ev.meta['wall_seconds']:.0f} s -> {args.out}")
        print(ev.markdown(["energy", "deletion"]))
    return 0


def main(argv=None) -> int:
    from ..errors import run_command
    return run_command(_cmd_evaluate, build_parser().parse_args(argv))


def compare_main(argv=None) -> int:
    """``python -m naflow_onnx.evaluate.compare``: rank variants across evaluate outputs."""
    from .compare import compare, markdown

    p = argparse.ArgumentParser(prog="python -m naflow_onnx.evaluate.compare")
    p.add_argument("outputs", nargs="+", help="folders written by naflow evaluate")
    p.add_argument("--stage", default="all internal", help="early, middle, late, final or 'all internal'")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    docs = []
    for o in args.outputs:
        f = Path(o) / "evaluation.json"
        if not f.is_file():
            print(f"naflow: error: {f} not found", file=sys.stderr)
            return 2
        docs.append(json.loads(f.read_text()))
    result = compare(docs, args.stage)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


def train_main(argv=None) -> int:
    """``python -m naflow_onnx.evaluate.train``: train (and export) the benchmark nets."""
    from . import nets
    from ..io import atomic_write
    from .train import DEFAULTS, EPOCHS, train

    from . import train as train_mod
    ap = argparse.ArgumentParser(description=train_mod.__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--arch", choices=nets.ARCHS)
    g.add_argument("--all", action="store_true", help="train every architecture")
    ap.add_argument("--out", type=Path, help="ONNX output (default: <out-dir>/synth_<arch>.onnx)")
    ap.add_argument("--out-dir", type=Path, default=Path("models"))
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--n-train", type=int, default=DEFAULTS["n_train"])
    ap.add_argument("--n-test", type=int, default=DEFAULTS["n_test"])
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs for every arch (default per arch: %s)" % EPOCHS)
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="torch seed (init, batches)")
    ap.add_argument("--train-seed", type=int, default=DEFAULTS["train_seed"])
    ap.add_argument("--test-seed", type=int, default=DEFAULTS["test_seed"])
    ap.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache generated data sets here (.npz)")
    ap.add_argument("--report", type=Path, default=None, help="write the summaries as JSON here")
    ap.add_argument("--min-acc", type=float, default=0.95, help="exit 1 if a test accuracy is lower")
    a = ap.parse_args(argv)
    if a.all and a.out is not None:
        ap.error("--out names one file; use --out-dir with --all")
    archs = list(nets.ARCHS) if a.all else [a.arch]
    summaries = []
    for arch in archs:
        out = None if a.no_export else (a.out or a.out_dir / f"synth_{arch}.onnx")
        epochs = a.epochs if a.epochs is not None else EPOCHS[arch]
        s = train(arch, out, a.n_train, a.n_test, epochs, a.batch_size, a.lr, a.weight_decay, a.seed,
                  a.train_seed, a.test_seed, a.threads, a.size, a.cache_dir,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps({k: v for k, v in s.items() if k != "history"}), flush=True)
        summaries.append(s)
    if a.report is not None:
        atomic_write(a.report, json.dumps(summaries, indent=1).encode())
    bad = [s["arch"] for s in summaries if s["test_acc"] < a.min_acc]
    if bad:
        print(f"test accuracy below {a.min_acc}: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
