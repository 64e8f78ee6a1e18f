"""Command line: ``naflow analyze | export | models``.

Exit codes: 0 success, 2 bad input or a model this tool cannot analyse (one line on stderr; the
traceback only with --debug), 130 interrupted. Nothing half-written is left behind.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .errors import NAFlowError


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _size(text: str):
    parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _damp(text: str) -> float:
    return math.inf if text.lower() in ("inf", "infinity") else float(text)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (default: the model's metadata, else imagenet)")
    g.add_argument("--preprocess", choices=["imagenet", "caffe-bgr", "none", "yolo"],
                   help="yolo: RGB / 255, letterboxed (Ultralytics)")
    g.add_argument("--mean", type=_floats, help="per-channel mean, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=_floats, help="per-channel std")
    g.add_argument("--size", type=_size, help="input size, e.g. 224 or 224x160 (H x W)")
    g.add_argument("--layout", choices=["NCHW", "NHWC"])
    p.add_argument("--labels", help="'imagenet', or a text file with one label per line")
    p.add_argument("--output", help="model output holding the class scores (default: the first)")
    p.add_argument("--provider", default="auto", help="onnxruntime provider: auto, cpu, cuda")
    p.add_argument("--device", help="torch device for the rebuild (default: cuda if available)")
    p.add_argument("--damp", type=_damp, default=None,
                   help="damping t of the least-squares inverses (0 = exact pinv, inf = none)")
    p.add_argument("--conv-inverse", choices=["lsq", "paper"], default="lsq")
    p.add_argument("--tol", type=float, default=1e-4, help="solver normal-equation tolerance")
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--parity-tol", type=float, default=1e-3)
    p.add_argument("--max-model-bytes", type=int, default=None)
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="refuse image files over this many pixels (default: PIL's limit, "
                        "about 89 million)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and onnxruntime (default: their own choice)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the model cache (README \"Cache\")")


def add_backend_options(p: argparse.ArgumentParser, resume_help: str | None = None,
                        batch_help: str = "") -> None:
    """--backend, --address, --workers, --batch (and --resume): naflow_onnx.backends,
    docs/ray.md. ``batch_help``: what the command batches beyond the default sentence."""
    g = p.add_argument_group("backend (docs/ray.md)")
    from .backends import BACKENDS, DEFAULT_BATCH, GPU_BATCH
    g.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"images analysed together: one forward and backward pass and one batched "
                        f"solve per batch (default {GPU_BATCH} when torch runs on a GPU, 1 on a "
                        f"CPU, where batches do not pay; results do not depend on it beyond the "
                        f"solver tolerance){batch_help}")
    g.add_argument("--backend", choices=BACKENDS, default="local",
                   help="local: this process (default); processes: worker processes on this "
                        "machine; ray: Ray actors; each worker loads the model once")
    g.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    g.add_argument("--workers", type=int, help="worker processes or Ray actors (default: the CPUs "
                   "of this machine or of the cluster)")
    if resume_help:
        g.add_argument("--resume", action="store_true", help=resume_help)


def analyzer_from_args(args):
    from .flow import DEFAULT_DAMP, Analyzer
    from .graph import DEFAULT_MAX_BYTES
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if getattr(args, "max_image_pixels", None) is not None and args.max_image_pixels < 1:
        raise NAFlowError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    return Analyzer(args.model, preprocess=args.preprocess, mean=args.mean, std=args.std,
                    size=args.size, layout=args.layout, provider=args.provider, device=args.device,
                    damp=DEFAULT_DAMP if args.damp is None else args.damp,
                    conv_inverse=args.conv_inverse, tol=args.tol, max_iter=args.max_iter,
                    parity_tol=args.parity_tol, labels=args.labels, output=args.output,
                    embedding_output=getattr(args, "embedding_output", None),
                    max_model_bytes=args.max_model_bytes or DEFAULT_MAX_BYTES,
                    max_image_pixels=getattr(args, "max_image_pixels", None),
                    cache=not getattr(args, "no_cache", False))


def _summary(flow, folder: Path) -> dict:
    t = flow.target
    if t.get("kind") in ("detection", "segmentation") and t.get("probability") is None:
        t = {**t, "probability": t.get("score") if t["kind"] == "detection" else None}
    return {"image": flow.input["path"], "out": str(folder), "target": t.get("index"),
            "label": t.get("label"), "probability": t.get("probability"),
            "layers": len(flow.layers), "final_layer": flow.final_layer,
            "parity_max_relative_error": flow.parity["max_relative_error"],
            "solver": flow.solver_summary(), "seconds": round(flow.timings["total_s"], 3),
            "similarity": ({k: t.get(k) for k in ("mode", "reference", "prediction", "cosine", "ranking")}
                           if t.get("kind") == "similarity" else None)}


def dense_target(args, analyzer):
    """--task detect|segment (or the model's default task) as the library's target spec, or
    None for a class or similarity target."""
    from .targets import (DetectionOptions, DetectionTarget, SegmentationOptions,
                          SegmentationTarget, model_task, parse_box)
    task = getattr(args, "task", None) or model_task(analyzer.graph)
    given = [k for k in ("box", "detection", "region") if getattr(args, k, None) is not None]
    wrong = [k for k in given if (k == "region") != (task == "segment")]
    if wrong:
        raise NAFlowError(f"--{wrong[0]} does not apply to task '{task}'")
    if task == "detect":
        return DetectionTarget(DetectionOptions(
            target=args.target, box=parse_box(args.box) if args.box else None,
            detection=args.detection, min_score=args.min_score))
    if task == "segment":
        return SegmentationTarget(SegmentationOptions(target=args.target, region=args.region))
    return None


def _similarity_target(args):
    """--reference / --support / --gallery / --prototypes (at most one) as the library's
    SimilarityTarget, or None for a class target."""
    from .similarity import SIMILARITY_MODES, SimilarityTarget
    mode = next((k for k in SIMILARITY_MODES if getattr(args, k, None)), None)
    if mode is None:
        return None
    return SimilarityTarget(mode, getattr(args, mode), target=args.target, top_k=args.top_k)


# run-level options of `analyze`: they do not change any result (not part of the resume key)
RUN_OPTIONS = ("out", "json", "quiet", "threads", "backend", "address", "workers", "resume",
               "retries", "debug", "func", "command", "images", "max_image_pixels", "batch",
               "no_cache")


def check_backend_args(args) -> None:
    """--address belongs to --backend ray, --workers to processes or ray; --batch >= 1."""
    from .backends import check_backend_options, check_batch
    check_backend_options(args.backend, args.address, args.workers)
    check_batch(args.batch)


class AnalyzeTask:
    """One image -> its result files (bytes of flow.json, maps.npz, flow.png, ...) and its summary.
    A ``naflow_onnx.backends.Task``: the files are rendered where the analysis ran (a Ray actor),
    written by the driver."""

    def __init__(self, args, segments_bar: bool = False, worker_threads: int | None = None):
        import os
        self.options = {k: v for k, v in vars(args).items() if k != "func"}
        self.cwd = os.getcwd()
        self.segments_bar = segments_bar
        self.worker_threads = worker_threads
        self.analyzer = None

    def __getstate__(self):
        return {**self.__dict__, "analyzer": None}

    def setup(self) -> None:
        import os
        if self.analyzer is not None:
            return
        try:
            os.chdir(self.cwd)      # relative model/image paths mean what they mean to the driver
        except OSError:
            raise NAFlowError(f"the folder {self.cwd} does not exist on this node: the ray backend "
                              "needs the model and images at the same paths on every node") from None
        args = argparse.Namespace(**{**self.options, "threads": self.options.get("threads")
                                     or self.worker_threads})
        self.analyzer = analyzer_from_args(args)
        if args.threads and self.worker_threads:
            from .capture import Capture
            self.analyzer.capture = Capture(self.analyzer.graph.model, args.provider,
                                            threads=args.threads)

    def _segments_bar(self, what: str):
        """The per-segment progress bar of the back-projection (local backend, one terminal)."""
        from tqdm import tqdm
        return tqdm(total=None, desc=f"segments ({what})", leave=False, unit="seg",
                    disable=None if self.segments_bar else True)

    def __call__(self, item) -> dict:
        from . import testhooks
        from .similarity import similarity_flows
        image, name = item
        testhooks.reached("analyze.image")
        args = argparse.Namespace(**self.options)
        with self._segments_bar(Path(image).name) as bar:
            partner = None
            similarity = _similarity_target(args)
            if similarity is not None:
                flow, partner = similarity_flows(self.analyzer, image, similarity, method=args.method,
                                                 compare=args.compare, layers=args.layers,
                                                 progress=bar.update)
            else:
                dense = dense_target(args, self.analyzer) if similarity is None else None
                flow = self.analyzer.analyze(image, target=None if dense else args.target,
                                             method=args.method, objective=dense,
                                             compare=args.compare, layers=args.layers,
                                             progress=bar.update)
        return _result(flow, name, partner)

    def run_batch(self, items: list) -> list[dict]:
        """Several images together (``Analyzer.analyze_many``: one batched forward, backward and
        solve); similarity targets are analysed one by one."""
        from . import testhooks
        args = argparse.Namespace(**self.options)
        if _similarity_target(args) is not None:
            return [self(item) for item in items]
        for _ in items:
            testhooks.reached("analyze.image")
        dense = dense_target(args, self.analyzer)
        with self._segments_bar(f"{len(items)} images") as bar:
            flows = self.analyzer.analyze_many(
                [image for image, _ in items], target=None if dense else args.target,
                method=args.method, objective=dense, compare=args.compare, layers=args.layers,
                batch=len(items), progress=bar.update)
        return [_result(flow, name) for flow, (_, name) in zip(flows, items)]


def _result(flow, name: str, partner=None) -> dict:
    """One analysed image as the driver writes it: its files' bytes (flow.json, maps.npz,
    flow.png, ...; rendered where the analysis ran) and its summary."""
    import tempfile

    from .io import write_flow_files
    with tempfile.TemporaryDirectory() as d:
        write_flow_files(flow, Path(d), partner=partner)
        files = {p.relative_to(d).as_posix(): p.read_bytes()
                 for p in sorted(Path(d).rglob("*")) if p.is_file()}
    return {"files": files, "summary": _summary(flow, Path(name or "."))}


def _resume_keys(args, analyzer, names: list[str]) -> list[str]:
    """Per image: sha256 of the model and image contents, every result-changing option and the
    version (naflow_onnx.resume)."""
    from . import __version__
    from .resume import digest, path_digest
    base = {"version": __version__, "model_sha256": analyzer.graph.sha256,
            "options": {k: v for k, v in sorted(vars(args).items())
                        if k not in RUN_OPTIONS and k != "model"}}
    for k in ("reference", "support", "gallery", "prototypes", "labels"):
        v = getattr(args, k, None)
        if v and Path(v).exists():
            base[f"{k}_sha256"] = path_digest(v)
    return [digest({**base, "image": str(image), "image_sha256": path_digest(image), "entry": name})
            for image, name in zip(args.images, names)]


def cmd_analyze(args) -> int:
    from .backends import Failure, resolve_batch, run_tasks
    from .io import check_output_dir, json_safe
    from .resume import RunState
    check_backend_args(args)
    out = Path(args.out)
    check_output_dir(out)                       # refused before the model is even loaded
    analyzer = analyzer_from_args(args)         # the model is validated here, once
    quiet = args.json or args.quiet
    many = len(args.images) > 1
    names = [f"{i:03d}_{Path(image).stem}" for i, image in enumerate(args.images)] if many else [""]
    local = args.backend == "local"
    task = AnalyzeTask(args, segments_bar=local and not quiet,
                       worker_threads=None if local else 1)
    if local:
        task.analyzer = analyzer
    state = RunState(out, resume=args.resume, markers=many, command="analyze")
    summaries: dict[int, dict] = {}
    failures: list[dict] = []
    try:
        state.open()
        keys = _resume_keys(args, analyzer, names) if many else [""]
        todo = []
        for i, name in enumerate(names):
            rec = state.lookup(name, keys[i])
            if rec is not None:
                summaries[i] = {**rec["summary"], "out": str(out / name)}
            else:
                todo.append(i)
        if state.reused and not args.quiet:
            print(f"naflow: --resume: {state.reused} of {len(names)} images already done in "
                  f"{out}", file=sys.stderr)
        items = [(args.images[i], names[i]) for i in todo]
        if not many and local:
            # one image in this process: errors propagate as they are (--debug tracebacks)
            results = [(0, task(items[0]))] if items else []
        else:
            results = run_tasks(task, items, backend=args.backend, address=args.address,
                                workers=args.workers, progress=not quiet and len(items) > 1,
                                desc="images", batch=resolve_batch(args.batch, args.device))
        for j, result in results:
            i = todo[j]
            if isinstance(result, Failure):
                if not many:
                    raise NAFlowError(result.message)
                failures.append({"index": i, "image": str(args.images[i]), "error": result.message})
                continue
            state.commit(names[i], keys[i], result["files"],
                         {"image": str(args.images[i]), "summary": result["summary"]})
            summaries[i] = {**result["summary"], "out": str(out / names[i]) if many else str(out)}
        if not summaries:
            first = min(failures, key=lambda f: f["index"])
            more = f" (and {len(failures) - 1} more images failed)" if len(failures) > 1 else ""
            where = "" if first["error"].startswith(first["image"]) else f"{first['image']}: "
            raise NAFlowError(f"{where}{first['error']}{more}")
        if failures:
            failures.sort(key=lambda f: f["index"])
            state.commit("", "", {"failures.json": (json.dumps(
                {"schema": "naflow-onnx/failures", "schema_version": 1, "images": len(names),
                 "failed": failures}, indent=2) + "\n").encode()})
        state.finish()
    except BaseException:
        state.abandon()
        raise
    ordered = [summaries[i] for i in sorted(summaries)]
    if args.json:
        failed = {f["index"]: {"image": f["image"], "error": f["error"]} for f in failures}
        rows = [summaries.get(i) or failed[i] for i in range(len(names))]
        print(json.dumps(json_safe(rows if len(rows) > 1 else rows[0]), indent=2))
    else:
        for s in ordered:
            if s.get("similarity"):
                sim = s["similarity"]
                print(f"{s['image']}: {sim['mode']} -> '{sim['reference']}' (cosine "
                      f"{sim['cosine']:.3f}); {s['layers']} layers mapped; "
                      f"{s['seconds']:.1f} s -> {s['out']}/flow.png")
                continue
            label = f" '{s['label']}'" if s["label"] else ""
            prob = f" (p={s['probability']:.3f})" if s["probability"] is not None else ""
            print(f"{s['image']}: class {s['target']}{label}{prob}; "
                  f"{s['layers']} layers mapped; parity {s['parity_max_relative_error']:.2e}; "
                  f"max solver residual {s['solver']['max_convergence']:.1e}; "
                  f"{s['seconds']:.1f} s -> {s['out']}/flow.png")
    for f in failures:
        where = "" if f["error"].startswith(f["image"]) else f"{f['image']}: "
        print(f"naflow: error: {where}{f['error']}", file=sys.stderr)
    if failures:
        print(f"naflow: {len(failures)} of {len(names)} images failed; the others are in {out} "
              f"({out / 'failures.json'})", file=sys.stderr)
    return 2 if failures else 0


def is_onnx_model(path) -> bool:
    """an ONNX model"""
    import onnx
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything unreadable is not a model
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def cmd_export(args) -> int:
    from .io import check_output_file
    check_output_file(args.o, "output model", is_onnx_model)    # before any work
    from exporters.torch_export import export, load_factory, load_weights
    preprocess, labels, outputs, embedding, shape = args.preprocess, args.labels, None, None, None
    if args.model:
        from models.registry import MODELS, get_model
        if args.model not in MODELS:
            raise NAFlowError(f"unknown model '{args.model}' (see `naflow models`)")
        model, spec = get_model(args.model, weights=args.weights, embedding=args.embedding)
        preprocess = preprocess or spec.preprocess
        labels = labels or spec.labels
        outputs = list(spec.outputs)
        shape = (1, 3, spec.input_size, spec.input_size)
        if args.embedding:
            outputs = ["logits", "embedding"] if spec.kind == "classifier" else outputs
        if spec.kind == "embedding" or args.embedding:
            embedding = "embedding"
    elif args.factory:
        model = load_factory(args.factory)()
        if args.weights:
            load_weights(model, args.weights)
    else:
        raise NAFlowError("give MODULE:FACTORY or --model NAME")
    if args.input_shape:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    shape = shape or (1, 3, 224, 224)
    t0 = time.perf_counter()
    report = export(model, args.o, shape, exporter=args.exporter, keep_batchnorm=args.keep_batchnorm,
                    preprocess=preprocess, labels=labels, output_names=outputs,
                    embedding_output=embedding, opset=args.opset)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(report) if args.json else
          f"wrote {report['path']} ({report['exporter']} exporter, opset {report['opset']}, "
          f"{report['nodes']} nodes, parity {report['parity_relative_error']:.1e})")
    return 0


def cmd_models(args) -> int:
    from models.registry import MODELS
    rows = []
    for name, spec in MODELS.items():
        weights = spec.weights() if spec.weights else None
        rows.append({"name": name, "kind": spec.kind, "input_size": spec.input_size,
                     "preprocess": spec.preprocess if isinstance(spec.preprocess, str) else "custom",
                     "weights": weights or "none offline (untrained)", "description": spec.description})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<18} {r['kind']:<10} {r['input_size']:>4}  {r['preprocess']:<10} "
                  f"{'real weights' if r['weights'] != 'none offline (untrained)' else 'untrained'}"
                  f"  {r['description']}")
    return 0


def _delegate(module: str, function: str):
    """A subcommand whose own module parses its arguments (imported lazily)."""
    def run(args):
        import importlib
        fn = getattr(importlib.import_module(f"naflow_onnx.{module}"), function)
        return fn(args.argv + (["--debug"] if args.debug else []))
    return run


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    p = argparse.ArgumentParser(prog="naflow", description="NAFlow attention flow for ONNX CNNs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="attention map of every feature layer")
    a.add_argument("model", help="the .onnx file")
    a.add_argument("images", nargs="+", help="image file(s)")
    a.add_argument("--out", required=True, help="output folder: a new path, an empty folder or an "
                   "earlier naflow output (replaced atomically); anything else is refused")
    a.add_argument("--target", default=None, help="class index, label text, or top1 (default)")
    a.add_argument("--method", default="naflow", choices=METHODS)
    a.add_argument("--compare", choices=METHODS, help="second method, drawn as a second row")
    a.add_argument("--layers", help="all (default), op:Conv,Relu, or a regex on tensor names")
    dense = a.add_argument_group("detectors and segmenters (issue 16)")
    dense.add_argument("--task", choices=["classify", "embed", "detect", "segment"],
                       help="default: the metadata's task (Ultralytics), else from the output "
                            "layout ([1, 4+C, N] detect, [1, C, H, W] segment), else classify")
    dense_x = dense.add_mutually_exclusive_group()
    dense_x.add_argument("--box", help="detect: explain the box that best overlaps x0,y0,x1,y1 "
                         "(image pixels)")
    dense_x.add_argument("--detection", type=int, help="detect: explain the K-th box by score (1 = best)")
    dense.add_argument("--min-score", type=float, default=0.25,
                       help="detect: boxes scoring below this are not candidates (default 0.25)")
    dense.add_argument("--region", help="segment: x0,y0,x1,y1 (image pixels) or a mask image; "
                       "default: the pixels predicted as the class")
    sim = a.add_argument_group("similarity targets (embedding models, METHOD.md §6)")
    sim_x = sim.add_mutually_exclusive_group()
    sim_x.add_argument("--reference", help="explain the similarity to this reference image")
    sim_x.add_argument("--support", help="N-way 1-shot: folder of one image per class (file name = "
                       "class); predict by cosine and explain it (or --target CLASS)")
    sim_x.add_argument("--gallery", help="retrieval: folder of images; explain the top-1 match")
    sim_x.add_argument("--prototypes", help=".npz of class prototypes / memory-bank means")
    sim.add_argument("--embedding-output", help="the output holding the embedding "
                     "(default: metadata naflow.embedding_output)")
    sim.add_argument("--top-k", type=int, default=5, help="ranking length written to flow.json")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_options(a, resume_help="skip images whose results are already complete in --out "
                        "(from a finished, failed or interrupted run with the same model, image "
                        "and options; docs/ray.md)",
                        batch_help="; similarity targets (--reference, ...) are analysed one by one")
    _add_model_options(a)
    a.set_defaults(func=cmd_analyze)

    e = sub.add_parser("export", help="export a torch model to ONNX for naflow")
    e.add_argument("factory", nargs="?", help="MODULE:FACTORY returning an nn.Module")
    e.add_argument("--model", help="a registry name (see `naflow models`)")
    e.add_argument("--weights", help="state dict file (loaded with weights_only=True)")
    e.add_argument("--input-shape", help="e.g. 1,3,224,224")
    e.add_argument("-o", required=True, help="output .onnx path (an existing file is replaced only "
                   "if it is an ONNX model)")
    e.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    e.add_argument("--keep-batchnorm", action="store_true", help="do not fold BN into convs")
    e.add_argument("--preprocess", help="preset written into metadata_props")
    e.add_argument("--labels", help="'imagenet' or a JSON list, written into metadata_props")
    e.add_argument("--embedding", action="store_true", help="also output the embedding")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list the model registry")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    for name, module, function, text in (
            ("check", "check", "main_check", "gate a model on its attention over a set of images (docs/check.md)"),
            ("baseline", "check", "main_baseline", "record a trusted model's maps for `naflow check --baseline`"),
            ("gallery", "gallery_cli", "main", "export and analyse every registry model (docs/gallery.md)"),
            ("evaluate", "evaluate.cli", "main", "faithfulness and localisation of every layer's map, per method (docs/evaluation.md)")):
        c = sub.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        c.add_argument("argv", nargs=argparse.REMAINDER)
        c.set_defaults(func=_delegate(module, function))
    return p


def main(argv=None) -> int:
    from .errors import run_command
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
