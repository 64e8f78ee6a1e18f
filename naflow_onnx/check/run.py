"""``naflow check`` and ``naflow baseline`` as a library (the commands are in ``check.cli``).

``run(model, config, baseline=None, options=CheckOptions())`` analyses every configured image
and returns a ``CheckResult`` (``code``: 0 every check passed, 1 a check failed, 2 an image or
the sanity gate errored; ``report``; ``write(out)``: report.json, junit.xml, report.html).
``record_baseline(model, config, output, options)`` writes a baseline file for ``run``'s
``baseline``. A failed run (bad configuration, model, baseline) raises ``NAFlowError``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .. import testhooks
from ..backends import DEFAULT_BATCH, resolve_batch
from ..errors import NAFlowError
from ..methods import METHODS
from . import checks as ck
from .config import (DEFAULT_BASELINE_CORRELATION, CheckConfig, ConfigError, load_config)

DEFAULT_OUT = "naflow-check-report"
REPORT_SCHEMA = "naflow-onnx/check"
REPORT_VERSION = 1


# ------------------------------------------------------------------------------------------------
# analyses: in this process (with a small memo), or in worker processes (--jobs N)


@dataclass
class CheckOptions:
    """How ``run`` and ``record_baseline`` analyse. Only ``method`` changes results (default: the
    configuration's [analysis] method, else naflow); the rest says where and how the work runs:
    ``jobs`` local worker processes, or ``backend="ray"`` (``address``, ``workers``); ``threads``
    torch/onnxruntime threads per process; ``memo`` reuses this process's earlier analyses of
    the same model, image and settings; ``quiet``: no progress bar; ``batch``: images analysed
    together (one batched forward, backward and solve; 1 = one by one); ``cache``: read and
    write the model cache (README "Cache")."""

    method: str | None = None
    jobs: int = 1
    threads: int | None = None
    provider: str = "auto"
    device: str | None = None
    backend: str = "local"
    address: str | None = None
    workers: int | None = None
    quiet: bool = True
    memo: bool = True
    batch: int | None = DEFAULT_BATCH       # None: backends.resolve_batch
    cache: bool = True

    def validate(self) -> None:
        from ..backends import check_backend_options, check_batch
        if self.jobs < 1:
            raise NAFlowError(f"--jobs must be >= 1, got {self.jobs}")
        check_batch(self.batch)
        check_backend_options(self.backend, self.address, self.workers)
        if self.backend == "ray" and self.jobs != 1:
            raise NAFlowError("--jobs is for the local backend; with --backend ray give --workers")


@dataclass
class CheckResult:
    """What ``run`` returns: the exit code (0 pass, 1 a check failed, 2 an error), the report
    (report.json's content) and what the HTML report draws."""

    code: int
    report: dict
    extras: dict

    def write(self, out, html_all: bool = False, state=None) -> Path:
        """report.json, junit.xml, report.html into ``out`` (see ``write_reports``)."""
        return write_reports(out, self.report, self.extras, html_all=html_all, state=state)


@dataclass(frozen=True)
class Spec:
    """What a worker needs to build the same Analyzer as the main process."""
    model: str
    preprocess: str | None
    damp: float | None
    provider: str | None
    device: str | None
    method: str
    layers: str | None
    threads: int | None = None
    memo: bool = True
    cache: bool = True

    def analyzer(self, model=None):
        from ..capture import Capture
        from ..flow import DEFAULT_DAMP, Analyzer
        a = Analyzer(model if model is not None else self.model, preprocess=self.preprocess,
                     damp=DEFAULT_DAMP if self.damp is None else self.damp,
                     provider=self.provider, device=self.device, cache=self.cache)
        if self.threads:
            # onnxruntime's session takes every core by default; with --jobs that oversubscribes
            a.capture = Capture(a.graph.model, self.provider, threads=self.threads)
        return a


_MEMO: "OrderedDict[tuple, object]" = OrderedDict()
_MEMO_SIZE = 8


def _memo_key(analyzer, spec: Spec, image: Path, target) -> tuple:
    pp = json.dumps(analyzer.preprocess.as_dict(), sort_keys=True)
    return (analyzer.graph.sha256, ck.file_sha256(image), pp, spec.method, spec.layers,
            analyzer.opts.damp, analyzer.opts.conv_inverse, analyzer.opts.tol,
            analyzer.opts.max_iter, analyzer.capture.provider, str(analyzer.device), target)


def clear_memo() -> None:
    """Forget the analyses memoised in this process (``analyse``)."""
    _MEMO.clear()


def analyse(analyzer, spec: Spec, image: Path, target=None):
    """One analysis (``analyse_many`` of one image)."""
    return analyse_many(analyzer, spec, [(image, target)])[0]


def _target_args(target) -> dict:
    """A check target as ``Analyzer.analyze``'s ``target`` and ``objective``: a class index (None:
    top-1), or ("detect", class or None) for a detector: the highest-scoring box of the class (of
    any class for None); every score is a candidate, so a missing detection fails box_iou
    instead of erroring."""
    if isinstance(target, (tuple, list)) and target[0] == "detect":
        from ..targets import DetectionOptions, DetectionTarget
        return {"target": None, "objective": DetectionTarget(
            DetectionOptions(target=target[1], min_score=0.0) if target[1] is not None
            else DetectionOptions())}
    return {"target": target, "objective": None}


def analyse_many(analyzer, spec: Spec, pairs: list[tuple[Path, object]]) -> list:
    """The flows of several (image, target) pairs, memoised in this process unless
    ``spec.memo`` is off (same model file content, image content, settings and target give the
    same maps: the engine is deterministic). The images not in the memo are analysed together
    (``Analyzer.analyze_many``)."""
    use = spec.memo
    keys = [_memo_key(analyzer, spec, image, target) if use else None for image, target in pairs]
    flows = [_MEMO.get(key) if use else None for key in keys]
    for key, flow in zip(keys, flows):
        if flow is not None:
            _MEMO.move_to_end(key)
    todo = [j for j, flow in enumerate(flows) if flow is None]
    args = [_target_args(pairs[j][1]) for j in todo]
    new = analyzer.analyze_many([pairs[j][0] for j in todo], target=[a["target"] for a in args],
                                objective=[a["objective"] for a in args], method=spec.method,
                                layers=spec.layers, batch=max(1, len(todo)))
    for j, flow in zip(todo, new):
        flow.tensors = None
        flows[j] = flow
        if use:
            _MEMO[keys[j]] = flow
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
    return flows


def _safe(fn, *args):
    try:
        return "ok", fn(*args)
    except NAFlowError as exc:
        return "error", str(exc)
    except Exception as exc:  # noqa: BLE001 - reported as an error of this image, traceback kept
        return "crash", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"


def _sanity_flow(spec: Spec, image: Path, target: int, count: int, seed: int):
    randomised, names = ck.randomise_weights(spec.model, count=count, seed=seed)
    flow = spec.analyzer(randomised).analyze(image, target=target, method=spec.method,
                                             layers=spec.layers)
    flow.tensors = None
    return flow, names


class CheckTask:
    """One (image, target) -> ``_safe``'s (status, flow-or-message) on a backend worker
    (``naflow_onnx.backends.Task``): the worker builds its Analyzer once in ``setup``."""

    def __init__(self, spec: Spec):
        self.spec, self.cwd, self.analyzer = spec, os.getcwd(), None

    def __getstate__(self):
        return {**self.__dict__, "analyzer": None}

    def setup(self) -> None:
        import torch
        if self.analyzer is not None:     # the local backend: this process's analyzer
            return
        try:
            os.chdir(self.cwd)      # relative paths mean what they mean to the driver
        except OSError:
            raise NAFlowError(f"the folder {self.cwd} does not exist on this node: the ray backend "
                              "needs the model and images at the same paths on every node") from None
        if self.spec.threads:
            torch.set_num_threads(self.spec.threads)
        self.analyzer = self.spec.analyzer()

    def __call__(self, item):
        image, target = item
        return _safe(lambda: analyse(self.analyzer, self.spec, Path(image), target))

    def run_batch(self, items: list) -> list:
        """Several (image, target) items of this model and method analysed together; if that
        raises, ``run_tasks`` runs them one by one (``__call__``), so a bad image errors alone."""
        flows = analyse_many(self.analyzer, self.spec, [(Path(im), t) for im, t in items])
        return [("ok", flow) for flow in flows]


# ------------------------------------------------------------------------------------------------
# the per-image flow cache of --resume (naflow_onnx.resume): OUT/.naflow-cache/<entry>/

CACHE_DIR = ".naflow-cache"


def _npz_bytes(arrays: dict) -> bytes:
    import tempfile

    from ..io import write_npz
    with tempfile.TemporaryDirectory() as d:
        write_npz(Path(d) / "a.npz", arrays)
        return (Path(d) / "a.npz").read_bytes()


def flow_files(flow) -> dict[str, bytes]:
    """A flow as files: flow.json (Flow.to_json), maps.npz, compare_maps.npz, image.npy."""
    import io as _io

    import numpy as np

    from ..io import json_safe
    files = {"flow.json": json.dumps(json_safe(flow.to_json()), allow_nan=False).encode(),
             "maps.npz": _npz_bytes(flow.maps)}
    if flow.compare_maps:
        files["compare_maps.npz"] = _npz_bytes(flow.compare_maps)
    buf = _io.BytesIO()
    np.save(buf, np.ascontiguousarray(flow.image), allow_pickle=False)
    files["image.npy"] = buf.getvalue()
    return files


def flow_from_files(folder: Path):
    """The Flow that ``flow_files`` wrote (without ``tensors`` and the per-tensor parity)."""
    import numpy as np

    from ..flow import Flow

    def npz(name):
        if not (folder / name).is_file():
            return {}
        with np.load(folder / name, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return Flow.from_json(json.loads((folder / "flow.json").read_text()), npz("maps.npz"),
                          np.load(folder / "image.npy", allow_pickle=False),
                          npz("compare_maps.npz"))


def _cache_entry(cfg: CheckConfig, image: Path) -> str:
    key = cfg.keys[image]
    return f"{CACHE_DIR}/{Path(key).stem[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _cache_key(st: "Setup", image: Path) -> str:
    from .. import __version__
    from ..resume import digest
    return digest({"version": __version__, "model_sha256": st.analyzer.graph.sha256,
                   "image": str(image), "image_sha256": ck.file_sha256(image),
                   "settings": st.settings, "target": st.targets[image], "method": st.spec.method,
                   "layers": st.spec.layers, "provider": st.spec.provider,
                   "device": st.spec.device})


def _own_arrays(flow):
    """Writable copies of a flow's arrays: Ray hands numpy arrays over as read-only views of its
    object store, which they would also keep pinned."""
    import numpy as np
    flow.maps = {k: np.array(v) for k, v in flow.maps.items()}
    flow.compare_maps = {k: np.array(v) for k, v in flow.compare_maps.items()}
    flow.image = np.array(flow.image)
    return flow


class Runner:
    """Runs the analyses through ``naflow_onnx.backends.run_tasks``: in this process (jobs = 1,
    this process's Analyzer), in ``jobs`` worker processes (each builds its Analyzer once and
    exits when this process dies), or on Ray actors (backend "ray"). The sanity gate runs in
    this process."""

    def __init__(self, analyzer, spec: Spec, jobs: int, backend: str = "local",
                 address: str | None = None, workers: int | None = None, batch: int = 1):
        self.analyzer, self.spec, self.jobs = analyzer, spec, max(1, int(jobs))
        self.batch = batch
        self.backend, self.address, self.workers = backend, address, workers
        self._run = None
        self.stats = {"backend": backend, "address": address,
                      "workers": self.jobs if backend == "local" else workers,
                      "worker_deaths": 0, "resubmitted": 0}
        self.engine = backend
        if backend == "ray":
            # one CPU per actor: torch and onnxruntime get one thread each unless --threads
            self.spec = Spec(**{**spec.__dict__, "threads": spec.threads or 1})
        elif self.jobs > 1:
            threads = spec.threads or max(1, (os.cpu_count() or 1) // self.jobs)
            self.spec = Spec(**{**spec.__dict__, "threads": threads})
            self.engine, self.workers = "processes", self.jobs

    def analyses(self, tasks: list[tuple[Path, object]]):
        """Yield (index, status, flow-or-message) as analyses finish."""
        from ..backends import Failure, run_tasks
        task = CheckTask(self.spec)
        if self.engine == "local":
            task.analyzer = self.analyzer
        run = self._run = run_tasks(task, [(str(image), target) for image, target in tasks],
                                    backend=self.engine, address=self.address,
                                    workers=self.workers, progress=False, batch=self.batch)
        with run:
            try:
                for i, result in run:
                    if isinstance(result, Failure):
                        yield i, "error", result.message
                    else:
                        status, value = result
                        yield i, status, _own_arrays(value) if status == "ok" else value
            finally:
                self.stats.update({k: run.stats[k] for k in ("worker_deaths", "resubmitted")})
                if self.backend == "ray":
                    self.stats["workers"] = run.stats["workers"]

    def sanity(self, image: Path, target: int, count: int, seed: int):
        return _safe(_sanity_flow, self.spec, image, target, count, seed)

    def close(self):
        if self._run is not None:       # stops the workers of an unfinished run
            self._run.close()
            self._run = None


# ------------------------------------------------------------------------------------------------
# shared set-up of check and baseline


@dataclass
class Setup:
    cfg: CheckConfig
    spec: Spec
    analyzer: object
    targets: dict            # image -> None (top-1), class index, or ("detect", class or None)
    expected: dict           # image -> class index or None
    regions: dict            # image -> bool mask or None
    original_sizes: dict     # image -> (w, h)
    settings: dict = field(default_factory=dict)
    task: str = "classify"   # targets.model_task: detect -> box targets and box_iou


def _setup(model, config, opts: CheckOptions) -> Setup:
    from PIL import Image

    from ..importance import resolve_class
    from ..targets import ImageFrame, model_task
    opts.validate()
    cfg = load_config(config)
    method = opts.method or cfg.method
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, not '{method}'")
    cfg.method = method
    if opts.threads:
        import torch
        torch.set_num_threads(opts.threads)
    model = Path(model)
    if not model.is_file():
        raise NAFlowError(f"model not found: {model}")
    spec = Spec(model=str(model.resolve()), preprocess=cfg.preprocess, damp=cfg.damp,
                provider=opts.provider, device=opts.device, method=cfg.method, layers=cfg.layers,
                threads=opts.threads, memo=opts.memo, cache=opts.cache)
    analyzer = spec.analyzer()
    size = tuple(analyzer.preprocess.size)
    labels = analyzer.labels
    task = model_task(analyzer.graph)
    targets, expected, regions, sizes = {}, {}, {}, {}
    for image in cfg.images:
        try:
            with Image.open(image) as im:
                sizes[image] = im.size
        except Exception:  # noqa: BLE001 - the analysis reports unreadable images
            sizes[image] = None
        exp = cfg.expect.get(image)
        idx = None
        if exp is not None and exp.cls is not None:
            where = cfg.where("expect", "class", exp.index)
            if isinstance(exp.cls, str):
                if not labels:
                    raise ConfigError(f"{where}: expect[{exp.index}].class '{exp.cls}' is a label "
                                      "but the model has no labels: give the class index")
                try:
                    import torch
                    idx = resolve_class(exp.cls, torch.zeros(1, len(labels)), labels)
                except NAFlowError as e:
                    raise ConfigError(f"{where}: expect[{exp.index}].class: {e}") from None
            else:
                idx = int(exp.cls)
                if labels and idx >= len(labels):
                    raise ConfigError(f"{where}: expect[{exp.index}].class {idx} is out of range: "
                                      f"the model has {len(labels)} classes")
        expected[image] = idx
        targets[image] = idx if cfg.target == "expected" and idx is not None else None
        if task == "detect":
            targets[image] = ("detect", idx)
        region = None
        if exp is not None and (exp.box is not None or exp.mask is not None):
            key = "box" if exp.box is not None else "mask"
            try:
                if task == "detect":
                    region = _detection_region(exp, size, sizes[image], analyzer, ImageFrame)
                else:
                    region = ck.region_mask(exp, size, sizes[image])
            except NAFlowError as e:
                raise ConfigError(f"{cfg.where('expect', key, exp.index)}: expect[{exp.index}].{key}: "
                                  f"{e}") from None
        regions[image] = region
    settings = {**cfg.analysis_record(), "damp": analyzer.opts.damp,
                "preprocess": analyzer.preprocess.as_dict()}
    if math.isinf(settings["damp"]):
        settings["damp"] = "inf"
    return Setup(cfg, spec, analyzer, targets, expected, regions, sizes, settings, task)


def _detection_region(exp, size, original_size, analyzer, frame_cls):
    """A detector's expected box is in the original image's pixels (as the explained box in
    flow.json): the mask at the network input goes through the image's resize (letterbox)."""
    from dataclasses import replace
    if exp.box is None:
        raise NAFlowError("a detector's region is a 'box' in image pixels, not a mask")
    if original_size is None:
        return None
    w0, h0 = original_size
    x0, y0, x1, y1 = exp.box
    if x1 > w0 or y1 > h0:
        raise NAFlowError(f"box {exp.box} lies outside the image ({w0}×{h0} pixels, W×H): a "
                          "detector's box is in the original image's pixels")
    frame = frame_cls(tuple(original_size), size, analyzer.preprocess.resize)
    return ck.region_mask(replace(exp, box=frame.to_input(exp.box)), size)


def _progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm
    # a bar on a terminal only (disable=None), never into CI logs
    return tqdm(total=total, desc=desc, unit="image", disable=True if quiet else None, leave=False)


def _layers_record(flow) -> list[dict]:
    return [{"index": layer.index, "tensor": layer.tensor, "op_type": layer.op_type,
             "shape": list(layer.shape), "final": layer.final} for layer in flow.layers]


# ------------------------------------------------------------------------------------------------
# naflow check


def run(model, config, baseline=None, options: CheckOptions | None = None,
        state=None) -> CheckResult:
    """The whole check of ``model`` (an .onnx path) against ``config`` (a TOML path), with the
    baseline file ``baseline`` (default: the configuration's [baseline] path). Raises
    NAFlowError for a failed run. ``state`` (a naflow_onnx.resume.RunState on the report
    folder): every analysed image's flow is kept in it, and with ``resume`` the flows already
    there are reused."""
    from ..targets import DetectionOptions
    t0 = time.perf_counter()
    opts = options or CheckOptions()
    st = _setup(model, config, opts)
    cfg = st.cfg
    bpath = baseline or cfg.baseline_path
    baseline = None
    bthreshold = cfg.baseline_correlation if cfg.baseline_correlation is not None \
        else DEFAULT_BASELINE_CORRELATION
    if bpath:
        baseline = ck.read_baseline(bpath)
        ck.check_settings(baseline, st.settings)
    enabled = {"prediction": cfg.prediction or None, "final_mass_in_region": cfg.final_mass,
               "flow_stability": cfg.flow_stability,
               "baseline_correlation": bthreshold if baseline or cfg.baseline_correlation is not None
               else None,
               "sanity": cfg.sanity,
               "box_iou": cfg.box_iou if st.task == "detect" and any(
                   e.cls is not None and e.box is not None for e in cfg.expect.values()) else None}
    enabled = {k: v for k, v in enabled.items() if v is not None}
    if not enabled:
        raise ConfigError(f"{cfg.where('checks')}: no check is enabled: set one in [checks] "
                          "(e.g. prediction = true) or give --baseline")

    runner = _runner(st, opts)
    images = cfg.images
    flows: dict = {}
    errors: dict = {}
    matching = None
    keys = {im: _cache_key(st, im) for im in images} if state is not None else {}
    todo = []
    for im in images:
        rec = state.lookup(_cache_entry(cfg, im), keys[im]) if state is not None else None
        if rec is not None:
            flows[im] = flow_from_files(state.stage / _cache_entry(cfg, im))
        else:
            todo.append(im)
    resumed = len(images) - len(todo)
    if baseline is not None and flows:
        matching = ck.match_layers(baseline, flows[next(im for im in images if im in flows)].layers,
                                   cfg.baseline_match, st.analyzer.graph.sha256)
    bar = _progress(len(images) + (1 if cfg.sanity is not None else 0), opts.quiet, "naflow check")
    bar.update(resumed)
    try:
        for i, status, result in runner.analyses([(im, st.targets[im]) for im in todo]):
            bar.update(1)
            testhooks.reached("check.result")
            if status == "ok":
                flows[todo[i]] = result
                if baseline is not None and matching is None:   # a refusal writes nothing
                    matching = ck.match_layers(baseline, result.layers, cfg.baseline_match,
                                               st.analyzer.graph.sha256)
                if state is not None:
                    state.commit(_cache_entry(cfg, todo[i]), keys[todo[i]], flow_files(result),
                                 {"image": cfg.keys[todo[i]]})
            else:
                errors[todo[i]] = result
        sanity = None
        if cfg.sanity is not None:
            simg = cfg.sanity_image or next((im for im in images if im in flows), None)
            if simg is None or simg not in flows:
                sanity = ck.record("sanity", "error", threshold=cfg.sanity,
                                   message="no analysed image to run the sanity gate on")
            else:
                status, result = runner.sanity(simg, int(flows[simg].target["index"]),
                                               cfg.sanity_layers, cfg.sanity_seed)
                if status == "ok":
                    rflow, names = result
                    sanity = ck.check_sanity(flows[simg], rflow, cfg.sanity, names)
                    sanity["image"] = cfg.keys[simg]
                    sanity["_flows"] = (flows[simg], rflow)
                else:
                    sanity = ck.record("sanity", "error", threshold=cfg.sanity,
                                       message=result.splitlines()[0], image=cfg.keys[simg])
                    if status == "crash":
                        sanity["traceback"] = result
            bar.update(1)
    finally:
        bar.close()
        runner.close()

    per_image = []
    for image in images:
        key = cfg.keys[image]
        entry = {"key": key, "path": str(image), "original_size": st.original_sizes.get(image),
                 "expected_class": st.expected[image],
                 "region": ({"box": cfg.expect[image].box} if image in cfg.expect and
                            cfg.expect[image].box is not None else
                            {"mask": str(cfg.expect[image].mask)} if st.regions[image] is not None
                            else None),
                 "checks": []}
        if image in errors:
            msg = errors[image]
            entry.update(status="error", error=msg.splitlines()[0])
            if "\n" in msg:
                entry["traceback"] = msg
            per_image.append(entry)
            continue
        flow = flows[image]
        detect = flow.target.get("kind") == "detection"
        entry.update(target={k: flow.target.get(k) for k in
                             (("index", "label", "score", "box") if detect else
                              ("index", "label", "probability"))},
                     prediction=int(flow.target["index"] if detect else flow.target["top5"][0]["index"]),
                     input_size=list(flow.image.shape[:2]))
        recs = entry["checks"]
        exp = cfg.expect.get(image)
        if cfg.prediction:
            recs.append(ck.record("prediction", "skip", message="a detector explains the box of the "
                                  "expected class: box_iou checks it") if detect else
                        ck.check_prediction(flow, st.expected[image], st.analyzer.labels)
                        if st.expected[image] is not None else
                        ck.record("prediction", "skip", message="no expected class for this image"))
        if "box_iou" in enabled:
            recs.append(ck.check_box(flow, exp.box, cfg.box_iou, DetectionOptions().min_score)
                        if detect and exp is not None and exp.cls is not None and exp.box is not None
                        else ck.record("box_iou", "skip", threshold=cfg.box_iou,
                                       message="no expected class and box for this image"))
        if cfg.final_mass is not None:
            thr = exp.min_mass if exp is not None and exp.min_mass is not None else cfg.final_mass
            recs.append(ck.check_mass(flow, st.regions[image], thr) if st.regions[image] is not None
                        else ck.record("final_mass_in_region", "skip", threshold=thr,
                                       message="no region (box or mask) for this image"))
        if cfg.flow_stability is not None:
            recs.append(ck.check_stability(flow, cfg.flow_stability, cfg.stability_stages))
        if baseline is None and cfg.baseline_correlation is not None:
            recs.append(ck.record("baseline_correlation", "skip", threshold=bthreshold,
                                  message="no baseline given (--baseline or [baseline] path)"))
        if baseline is not None:
            recs.append(ck.check_baseline(flow, baseline, matching, key, ck.file_sha256(image),
                                          bthreshold, cfg.baseline_layers))
        entry["status"] = ("fail" if any(r["status"] == "fail" for r in recs) else "pass")
        per_image.append(entry)

    model_checks = []
    sanity_flows = None
    if sanity is not None:
        sanity_flows = sanity.pop("_flows", None)
        model_checks.append(sanity)

    all_recs = [r for e in per_image for r in e["checks"]] + model_checks
    n_err = len(errors) + sum(r["status"] == "error" for r in model_checks)
    summary = {"images": len(images), "checks": len(all_recs),
               "passed": sum(r["status"] == "pass" for r in all_recs),
               "failed": sum(r["status"] == "fail" for r in all_recs),
               "skipped": sum(r["status"] == "skip" for r in all_recs),
               "errors": n_err}
    code = 2 if n_err else (1 if summary["failed"] else 0)
    any_flow = next(iter(flows.values()), None)
    report = {
        "schema": REPORT_SCHEMA, "schema_version": REPORT_VERSION,
        "status": {0: "pass", 1: "fail", 2: "error"}[code], "exit_code": code,
        "model": {"path": str(model), "sha256": st.analyzer.graph.sha256,
                  "layers": len(any_flow.layers) if any_flow else None,
                  "final_layer": any_flow.final_layer if any_flow else None},
        "config": {"path": str(config), "sha256": cfg.sha256},
        "analysis": st.settings,
        "checks": enabled,
        "baseline": ({"path": str(bpath), "model_sha256": baseline.meta["model"]["sha256"],
                      "same_model": matching["same_model"] if matching else None,
                      "matched_by": matching["by"] if matching else None,
                      "threshold": bthreshold, "layer_thresholds": cfg.baseline_layers,
                      } if baseline else None),
        "summary": summary,
        "images": per_image,
        "model_checks": model_checks,
        "layers": _layers_record(any_flow) if any_flow else [],
        "jobs": runner.stats["workers"] or runner.jobs,
        "backend": {"name": runner.backend, "address": runner.address,
                    "worker_deaths": runner.stats["worker_deaths"],
                    "resubmitted": runner.stats["resubmitted"], "resumed": resumed},
        "timings": {"total_s": round(time.perf_counter() - t0, 3)},
    }
    return CheckResult(code, report, {"flows": flows, "regions": {cfg.keys[k]: v for k, v in st.regions.items()},
                          "baseline": baseline, "matching": matching, "sanity_flows": sanity_flows,
                          "labels": st.analyzer.labels})


def write_reports(out, report: dict, extras: dict, html_all: bool = False, state=None) -> Path:
    """report.json, junit.xml, report.html into ``out``, replaced atomically (with ``state``, its
    staging folder, flow cache included, becomes ``out``)."""
    from ..io import atomic_dir
    from . import report as rp

    def write(tmp: Path):
        rp.write_json(tmp / "report.json", report)
        rp.write_junit(tmp / "junit.xml", report)
        rp.write_html(tmp / "report.html", report, extras, include_passing=html_all)
    if state is None:
        with atomic_dir(out, "check") as tmp:
            write(tmp)
    else:
        write(state.open())
        state.finish()
    return Path(out)


def _runner(st: Setup, opts: CheckOptions) -> Runner:
    return Runner(st.analyzer, st.spec, opts.jobs, backend=opts.backend, address=opts.address,
                  workers=opts.workers, batch=resolve_batch(opts.batch, opts.device))


# ------------------------------------------------------------------------------------------------
# naflow baseline


def record_baseline(model, config, output, options: CheckOptions | None = None) -> dict:
    """Analyse every image of ``config`` with ``model`` and write the baseline file ``output``
    (atomically); returns its metadata. Any image that fails raises NAFlowError (nothing
    written)."""
    from .. import __version__
    opts = options or CheckOptions()
    st = _setup(model, config, opts)
    cfg = st.cfg
    runner = _runner(st, opts)
    images = cfg.images
    flows, errors = {}, {}
    bar = _progress(len(images), opts.quiet, "naflow baseline")
    try:
        for i, status, result in runner.analyses([(im, st.targets[im]) for im in images]):
            bar.update(1)
            if status == "ok":
                flows[images[i]] = result
            else:
                errors[images[i]] = result
    finally:
        bar.close()
        runner.close()
    if errors:
        image, msg = next((im, errors[im]) for im in images if im in errors)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise NAFlowError(f"{cfg.keys[image]}: {msg.splitlines()[0]}{more}; no baseline written")
    first = flows[images[0]]
    layers = [layer.tensor for layer in first.layers]
    for image in images[1:]:
        if [layer.tensor for layer in flows[image].layers] != layers:
            raise NAFlowError(f"{cfg.keys[image]}: the model maps other layers for this image than "
                              f"for {cfg.keys[images[0]]}; no baseline written")
    meta = {
        "schema": ck.BASELINE_SCHEMA, "schema_version": ck.BASELINE_VERSION,
        "created_by": f"naflow-onnx {__version__}",
        "model": {"path": str(model), "sha256": st.analyzer.graph.sha256,
                  "final_layer": first.final_layer, "layers": _layers_record(first)},
        "analysis": st.settings,
        "config": {"path": str(config), "sha256": cfg.sha256,
                   "analysis_sha256": hashlib.sha256(json.dumps(st.settings, sort_keys=True)
                                                     .encode()).hexdigest()},
        "images": [{"key": cfg.keys[im], "sha256": ck.file_sha256(im),
                    "target": int(flows[im].target["index"]),
                    "prediction": int(flows[im].target["top5"][0]["index"])} for im in images],
    }
    maps = [[flows[im].maps[t] for t in layers] for im in images]
    ck.write_baseline(output, meta, maps)
    return meta


