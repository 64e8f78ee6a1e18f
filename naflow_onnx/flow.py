"""Orchestration of one analysis and the ``Flow`` result.

``Analyzer`` holds what is computed once per model (validated graph, onnxruntime session, plan
per input shape). One image goes through stages a caller can also run one by one (check and
evaluate do; docs/architecture.md):

``prepare``     image -> ``Point``: capture (onnxruntime), rebuild forward (torch) + parity, plan,
                target, Lambda;
``backproject`` ``Point`` (+ damping) -> ``BPFMResult``: BPFM and solver records;
``maps``        ``Point`` (+ ``BPFMResult``) + method -> raw map per layer;
``flow``        all of it -> ``Flow``.

``Analyzer.analyze`` is their composition.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import cache as cache_mod
from . import labels as labels_mod
from . import preprocess as pp_mod
from .capture import Capture
from .errors import NAFlowError, UnsupportedOpError
from .forward import image_parity, parity, run_graph
from .graph import DEFAULT_MAX_BYTES, ModelGraph, Plan, embedding_tensor, load_model, plan
from .importance import class_objective, importance, resolve_class, scores_of
from .similarity import SimilarityObjective
from .targets import ImageFrame, metadata_names
from .methods import METHODS, NEEDS_BPFM, layer_map, resize, resize_normalised
from .rules.backproject import backproject, records_of_image, refusals
from .rules.solver import DEFAULT_DAMP, SolverOptions

SCHEMA_VERSION = 1
COVERAGE_WARN = 0.9  # warn when fewer spatial conv outputs than this share get a map
# flow.json's keys that to_json writes from the fields (the rest is ``extra``)
_JSON_KEYS = ("schema", "schema_version", "model", "input", "preprocess", "target", "method",
              "compare", "options", "parity", "timings", "final_layer", "solver_summary", "layers",
              "skipped", "coverage")


@dataclass
class Layer:
    index: int
    tensor: str
    node: str
    op_type: str
    shape: list[int]
    segment: int | None
    final: bool
    solver: dict | None = None

    def as_dict(self) -> dict:
        return dict(index=self.index, tensor=self.tensor, node=self.node, op_type=self.op_type,
                    shape=self.shape, segment=self.segment, final=self.final, solver=self.solver)


@dataclass
class Flow:
    """The attention flow of one image: a raw map per feature layer, in forward order."""

    model: dict
    input: dict
    preprocess: dict
    target: dict
    method: str
    layers: list[Layer]
    maps: dict[str, np.ndarray]              # raw float32 H×W per tensor
    image: np.ndarray                        # uint8 H×W×3 network-input view
    parity: dict
    timings: dict
    options: dict
    skipped: dict[str, str] = field(default_factory=dict)
    # spatial conv outputs on the data path that get a map: mapped, total, ratio, unmapped
    coverage: dict = field(default_factory=dict)
    compare: str | None = None
    compare_maps: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    tensors: "Tensors | None" = field(default=None, repr=False)   # analyze(keep_tensors=True)

    @property
    def final_layer(self) -> str:
        """The last final feature tensor in forward order (a multi-scale head has several)."""
        return [layer.tensor for layer in self.layers if layer.final][-1]

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.tensor == name)

    @property
    def letterbox(self) -> dict | None:
        """The recorded letterbox transform (``targets.ImageFrame.as_dict``: original_size,
        scale, offset) when the input was letterboxed, else None."""
        frame = self.target.get("frame") or {}
        return frame if frame.get("resize") == "letterbox" else None

    def _unpad(self, a: np.ndarray) -> np.ndarray:
        """An array at the network input's size, cropped to the letterboxed image's area."""
        lb = self.letterbox
        (w0, h0), s, (left, top) = lb["original_size"], lb["scale"], lb["offset"]
        return a[top:top + round(h0 * s), left:left + round(w0 * s)]

    @property
    def picture(self) -> np.ndarray:
        """The image the overlays are drawn on: the network-input view; for a letterboxed input,
        the view without its padding, at the original image's size (the frame of
        ``resized`` and of the target's ``box``)."""
        if self.letterbox is None:
            return self.image
        from PIL import Image
        w0, h0 = self.letterbox["original_size"]
        return np.asarray(Image.fromarray(np.ascontiguousarray(self._unpad(self.image)))
                          .resize((w0, h0), Image.BILINEAR))

    def resized(self, name: str, compare: bool = False) -> np.ndarray:
        """The map of layer ``name`` at the size of ``picture``, min-max normalised to [0, 1]
        (``to_picture``)."""
        return self.to_picture((self.compare_maps if compare else self.maps)[name])

    def to_picture(self, m: np.ndarray) -> np.ndarray:
        """A raw map at the size of ``picture``, min-max normalised to [0, 1]: the network
        input's size; for a letterboxed input the map is brought to network-input pixels, its
        padding cropped and the rest resized to the original image."""
        if self.letterbox is None:
            return resize_normalised(m, self.image.shape[:2])
        w0, h0 = self.letterbox["original_size"]
        return resize_normalised(self._unpad(resize(m, self.image.shape[:2])), (h0, w0))

    def mask_to_picture(self, mask: np.ndarray) -> np.ndarray:
        """A boolean mask at the network input's size in the frame of ``picture`` (nearest)."""
        if self.letterbox is None:
            return mask
        from PIL import Image
        w0, h0 = self.letterbox["original_size"]
        cut = Image.fromarray(np.ascontiguousarray(self._unpad(mask)).astype(np.uint8) * 255)
        return np.asarray(cut.resize((w0, h0), Image.NEAREST)) > 127

    def solver_summary(self) -> dict:
        return solver_summary(layer.solver for layer in self.layers)

    def to_json(self) -> dict:
        return {
            "schema": "naflow-onnx/flow", "schema_version": SCHEMA_VERSION,
            "model": self.model, "input": self.input, "preprocess": self.preprocess,
            "target": self.target, "method": self.method, "compare": self.compare,
            "options": self.options, "parity": {k: v for k, v in self.parity.items() if k != "per_tensor"},
            "timings": self.timings, "final_layer": self.final_layer,
            "solver_summary": self.solver_summary(),
            "layers": [layer.as_dict() for layer in self.layers],
            "skipped": [{"tensor": t, "reason": r} for t, r in self.skipped.items()],
            "coverage": self.coverage,
            **self.extra,
        }

    @classmethod
    def from_json(cls, doc: dict, maps: dict[str, np.ndarray], image: np.ndarray,
                  compare_maps: dict[str, np.ndarray] | None = None) -> "Flow":
        """The inverse of ``to_json`` (flow.json's content, read back as strict JSON: a damping
        written "inf" is a float again) with the maps and the network-input view; without
        ``tensors`` and the per-tensor parity, which flow.json does not hold."""
        def number(v):
            return math.inf if v == "inf" else v
        layers = [Layer(**{**d, "solver": {**d["solver"], "damp": number(d["solver"].get("damp"))}
                           if d.get("solver") and "damp" in d["solver"] else d.get("solver")})
                  for d in doc["layers"]]
        options = {**doc["options"], "damp": number(doc["options"].get("damp"))}
        return cls(model=doc["model"], input=doc["input"], preprocess=doc["preprocess"],
                   target=doc["target"], method=doc["method"], layers=layers, maps=maps,
                   image=image, parity=doc["parity"], timings=doc["timings"], options=options,
                   skipped={r["tensor"]: r["reason"] for r in doc.get("skipped", [])},
                   coverage=doc.get("coverage", {}), compare=doc.get("compare"), compare_maps=compare_maps or {},
                   extra={k: v for k, v in doc.items() if k not in _JSON_KEYS})

    def plot(self, max_columns: int = 12, partner: "Flow | None" = None):
        """The flow strip; ``partner`` (the reference side of a similarity pair) adds its rows."""
        from .render import flow_figure
        return flow_figure(self, max_columns=max_columns, partner=partner)

    def save(self, directory) -> Path:
        from .io import save_flow
        return save_flow(self, directory)

    def _repr_png_(self):
        import io as _io
        fig = self.plot()
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        import matplotlib.pyplot as plt
        plt.close(fig)
        return buf.getvalue()


def solver_summary(records) -> dict:
    """Solved segments, worst convergence, iterations, all converged: over solver records."""
    recs = [r for r in records if r and r.get("kind") in ("cgls", "closed-form", "paper")]
    conv = [r["convergence"] for r in recs if r.get("convergence") is not None]
    return {"solved": len(recs), "max_convergence": max(conv) if conv else 0.0,
            "iterations": int(sum(r.get("iterations", 0) for r in recs)),
            "all_converged": bool(all(r.get("converged", True) for r in recs))}


def _check_methods(method: str) -> None:
    if method not in METHODS:
        raise NAFlowError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


@dataclass
class Point:
    """One image at the forward point (``Analyzer.prepare``): what the back-projection and every
    map method need. ``env`` holds every detached value of the forward pass; ``Lambda`` the
    importance of every data tensor; ``layers`` the chosen feature tensors in forward order."""

    image: object                    # what was given (path, array, PIL image)
    view: np.ndarray                 # uint8 H×W×3 network-input view
    note: str | None
    input_shape: list[int]
    env: dict[str, torch.Tensor]
    plan: Plan
    Lambda: dict[str, torch.Tensor]
    target: dict
    score_tensor: str
    parity: dict
    timings: dict
    layers: list[str]
    layer_spec: str | None = None
    batch: "_Batch | None" = field(default=None, repr=False)   # prepared with other images
    index: int = 0                                             # its row in that batch
    # sigma of the point-dependent maps, kept for another back-projection (another damping)
    sigmas: dict = field(default_factory=dict, repr=False)


@dataclass
class _Batch:
    """The forward point of several images analysed together (``Analyzer.prepare_many``):
    every data tensor's dim 0 is the image."""

    env: dict[str, torch.Tensor]
    Lambda: dict[str, torch.Tensor]
    plan: Plan
    layers: list[str]
    images: int
    solved: dict = field(default_factory=dict)   # (damp, stream) -> _Solved
    sigmas: dict = field(default_factory=dict)   # as Point.sigmas, one per image


@dataclass
class _Solved:
    """One batch's back-projection at one damping (shared by its points)."""

    bpfm: dict[str, torch.Tensor]
    records: dict[str, dict]
    seconds: float                        # each image's share
    maps: dict[str, dict[str, torch.Tensor]]
    nonfinite: list[list[str]]            # per image


class _MapTaker:
    """``BackProjection.run``'s ``release``: the maps of the chosen layers by ``methods`` from
    each BPFM the walk is done with, and which of them held non-finite values (per image)."""

    def __init__(self, env, lam, layers: set[str], methods, images: int):
        self.env, self.lam, self.layers, self.images = env, lam, layers, images
        self.maps = {m: {} for m in methods}
        self.nonfinite: list[list[str]] = [[] for _ in range(images)]

    def __call__(self, done: dict[str, torch.Tensor]) -> None:
        for t, b in done.items():
            if b is None or not b.numel():
                continue
            for i in _nonfinite_rows(b, self.images if b.shape[0] == self.images else 1):
                self.nonfinite[i].append(t)
            if t in self.layers:
                for m, maps in self.maps.items():
                    maps[t] = layer_map(m, self.env[t], self.lam[t], b)


def _nonfinite_rows(t: torch.Tensor, images: int = 1) -> list[int]:
    """The images (rows of dim 0; the whole tensor for one image) holding NaN or inf: two
    reductions per row (``isfinite(t).all()`` costs 20× more on CPU)."""
    if not t.numel():
        return []
    lo, hi = torch.aminmax(t.reshape(images, -1), dim=1)
    return (~(torch.isfinite(lo) & torch.isfinite(hi))).nonzero().flatten().tolist()


@dataclass
class BPFMResult:
    """The back-projection of one point at one damping (``Analyzer.backproject``)."""

    bpfm: dict[str, torch.Tensor]
    records: dict[str, dict]         # tensor -> how its BPFM was obtained (solver record)
    damp: float
    seconds: float
    # ``backproject(..., stream=methods)``: the maps of the chosen layers by those methods (torch,
    # on the device), taken as the walk went back and dropped each BPFM; and the tensors whose
    # BPFM held non-finite values
    maps: dict[str, dict[str, torch.Tensor]] | None = None
    nonfinite: list[str] | None = None

    def error(self) -> str | None:
        """Why the result must not become a map: a diverged solve (seen at t = 0.01 on
        MobileNetV2: an unconverged CGLS left non-finite values), else None."""
        bad = list(self.nonfinite or []) + [t for t, b in self.bpfm.items()
                                            if b is not None and _nonfinite_rows(b)]
        if not bad:
            return None
        return (f"the back-projection diverged at damping t = {self.damp:g}: {len(bad)} tensors "
                f"hold non-finite values (first '{bad[0]}'); use a larger --damp")

    def check(self) -> "BPFMResult":
        """``self``, or NAFlowError when the solve diverged."""
        message = self.error()
        if message:
            raise NAFlowError(message)
        return self

    def solver_summary(self) -> dict:
        return solver_summary(self.records.values())


@dataclass
class Tensors:
    """``analyze(keep_tensors=True)``: torch tensors by tensor name (activations ``A`` and
    importance ``Lambda`` of every data tensor, ``BPFM`` of the mapped ones), the ``plan`` and
    ``env``, every detached value of the forward pass."""

    A: dict[str, torch.Tensor]
    Lambda: dict[str, torch.Tensor]
    BPFM: dict[str, torch.Tensor]
    plan: Plan
    env: dict[str, torch.Tensor]


def _select_layers(features: list[str], mg: ModelGraph, spec: str | None) -> list[str]:
    """--layers: ``all``, ``op:Conv,Relu`` (op types), or a regex on tensor/node names."""
    if not spec or spec == "all":
        return features
    import re
    if spec.startswith("op:"):
        ops = {s.strip() for s in spec[3:].split(",")}
        chosen = [t for t in features if mg.node_of(t).op_type in ops]
    else:
        try:
            rx = re.compile(spec)
        except re.error as exc:
            raise NAFlowError(f"--layers '{spec}' is not a valid regex: {exc}") from None
        chosen = [t for t in features if rx.search(t) or rx.search(mg.node_of(t).name)]
    if not chosen:
        raise NAFlowError(f"--layers '{spec}' matches none of the {len(features)} feature layers")
    if features[-1] not in chosen:   # the final feature tensor is always shown (and framed)
        chosen.append(features[-1])
    return chosen


class Analyzer:
    """A loaded model, ready to analyse images. Reuse it across images: graph analysis and the
    onnxruntime session are built once. ``cache``: what depends only on the model (the graph
    check, the solver memo) is read from and written to the user cache folder (True), the folder
    given, or not at all (False); see ``cache.py`` and README "Cache"."""

    def __init__(self, model, *, preprocess: str | None = None, mean=None, std=None, size=None,
                 layout=None, provider: str | None = None, device: str | None = None,
                 damp: float = DEFAULT_DAMP, conv_inverse: str = "lsq", tol: float = 1e-4,
                 max_iter: int = 2000, parity_tol: float = 1e-3, labels=None,
                 output: str | None = None, embedding_output: str | None = None,
                 max_model_bytes: int = DEFAULT_MAX_BYTES, max_image_pixels: int | None = None,
                 reference_solver: bool = False, cache: bool | str | Path = True):
        if conv_inverse not in ("lsq", "paper"):
            raise NAFlowError(f"--conv-inverse must be 'lsq' or 'paper', not '{conv_inverse}'")
        if damp < 0:
            raise NAFlowError(f"--damp must be >= 0 (or inf), got {damp}")
        self.graph: ModelGraph = load_model(model, max_model_bytes, output, cache)
        self.capture = Capture(self.graph.model, provider)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            # TF32 convolutions/matmuls (~1e-3 relative) would break parity with onnxruntime
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.preprocess = pp_mod.resolve(self.graph.input_shape, self.graph.metadata, preprocess,
                                         mean=mean, std=std, size=size, layout=layout)
        self.labels = labels_mod.load_labels(labels) if labels else (
            labels_mod.from_metadata(self.graph.metadata) or metadata_names(self.graph.metadata))
        self.opts = SolverOptions(damp=float(damp), tol=tol, max_iter=max_iter,
                                  conv_inverse=conv_inverse, reference=reference_solver)
        # the point-independent solver memo, kept across processes (cache.py; False: none);
        # read at the first back-projection
        self.cache = cache_mod.ModelCache.open(cache, self.graph.sha256)
        self._cached_keys: set | None = None
        self.parity_tol = parity_tol
        self.max_image_pixels = max_image_pixels        # None: preprocess.DEFAULT_MAX_IMAGE_PIXELS
        self._plans: dict[tuple, Plan] = {}
        self._constants: dict[str, torch.Tensor] | None = None
        emb = embedding_output or self.graph.metadata.get("naflow.embedding_output")
        if emb is not None and emb not in self.graph.producer:
            raise NAFlowError(f"embedding output '{emb}' is not a tensor of this model")
        # the embedding before any L2 normalisation (METHOD.md §6)
        self.embedding_name = embedding_tensor(self.graph, emb) if emb else None

    def plan_for(self, values, score: str | None = None, dense: bool = False) -> Plan:
        key = (tuple(values[self.graph.input_name].shape), score, dense)
        if key not in self._plans:
            pl = plan(self.graph, values, score, dense)
            cov = pl.coverage
            if cov.get("total") and cov["ratio"] < COVERAGE_WARN:
                print(f"naflow: warning: only {cov['mapped']} of {cov['total']} spatial conv outputs "
                      f"on the data path get a map (first unmapped: '{cov['unmapped'][0]}'); "
                      "see 'coverage' in flow.json", file=sys.stderr)
            self._plans[key] = pl
        return self._plans[key]

    def _need_embedding(self) -> str:
        if self.embedding_name is None:
            outputs = [o.name for o in self.graph.model.graph.output]
            if len(outputs) != 1:
                raise NAFlowError(f"this model declares no embedding output and has {len(outputs)} "
                                  "outputs: give --embedding-output NAME (a model output or tensor "
                                  "holding the embedding)")
            # one output and no metadata: that output can only be the embedding
            self.embedding_name = embedding_tensor(self.graph, outputs[0])
        return self.embedding_name

    def embed(self, image) -> np.ndarray:
        """The embedding of an image (onnxruntime only), before L2 normalisation."""
        name = self._need_embedding()
        view, _ = pp_mod.load_image(image, self.preprocess.size, self.max_image_pixels,
                                       self.preprocess.resize)
        captured = self.capture.run(self.preprocess.to_input(view), [name])
        return np.asarray(captured[name], np.float64).reshape(-1)

    def similarity_objective(self, against, description: str = "reference", **details):
        """A similarity target against a reference: an embedding vector or an image."""
        name = self._need_embedding()
        vec = against if isinstance(against, np.ndarray) and against.ndim == 1 else self.embed(against)
        return SimilarityObjective(name, np.asarray(vec, np.float64), description, details)

    def forward(self, x: np.ndarray):
        """Capture with onnxruntime, rebuild in torch with grad tracking, check parity (of each
        image of a batch: a list of records when ``x`` holds several)."""
        t0 = time.perf_counter()
        captured = self.capture.run(x)
        t1 = time.perf_counter()
        if self._constants is None:  # initializers moved to the device once per model
            self._constants = {k: v.to(self.device) for k, v in self.graph.constants.items()}
        values = run_graph(self.graph, torch.from_numpy(x), self.device, track=True,
                           constants=self._constants)
        par = image_parity(values, captured, self.parity_tol, x.shape[0]) if x.shape[0] > 1 \
            else parity(values, captured, self.parity_tol)
        return values, par, {"capture_s": t1 - t0, "rebuild_s": time.perf_counter() - t1}

    # ------------------------------------------------------------------ the stages of one analysis
    def prepare(self, image, target=None, objective=None, layers: str | None = None,
                bpfm: bool = True) -> Point:
        """Stage 1: the image at the network input, the forward pass (onnxruntime capture, torch
        rebuild, parity), the plan, the target and its importance Λ of every data tensor.
        ``objective`` (e.g. ``similarity_objective``) replaces the class ``target``; a target
        spec with ``bind`` (``targets.DetectionTarget``, ``SegmentationTarget``) is bound to this
        forward pass first (it chooses the box or region). With
        ``bpfm`` (a back-projection will follow), a plan with no inverse rule for a node the
        back-projection would invert is refused here, before any Λ work, naming every one."""
        mg = self.graph
        view, note = pp_mod.load_image(image, self.preprocess.size, self.max_image_pixels,
                                       self.preprocess.resize)
        x = self.preprocess.to_input(view)
        values, par, timings = self.forward(x)
        if hasattr(objective, "bind"):
            objective = objective.bind(mg, values, self.labels,
                                       ImageFrame.of(image, view, self.preprocess.resize))
        pl = self.plan_for(values, getattr(objective, "score_name", None),
                           getattr(objective, "dense", False))
        chosen = self._chosen(pl, layers, bpfm)
        scores = scores_of(values, mg.score_name).detach()
        t0 = time.perf_counter()
        target_rec = None
        if objective is None:
            index = resolve_class(target, scores, self.labels)
            objective = class_objective(mg.score_name, index)
            target_rec = self._class_record(scores, index)
        lam = importance(values, objective, pl.data)
        if target_rec is None:
            target_rec = objective.record()
        timings["importance_s"] = time.perf_counter() - t0
        env = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        return Point(image=image, view=view, note=note, input_shape=list(x.shape), env=env,
                     plan=pl, Lambda=lam, target=target_rec,
                     score_tensor=getattr(objective, "score_name", mg.score_name), parity=par,
                     timings=timings, layers=chosen, layer_spec=layers)

    def _chosen(self, pl: Plan, layers: str | None, bpfm: bool) -> list[str]:
        """The layers to map; with ``bpfm``, refused here when the walk back to them would
        meet a node without an inverse rule (every such node named)."""
        mg = self.graph
        chosen = _select_layers(pl.features, mg, layers)
        if bpfm:
            refused = refusals(mg, pl, set(chosen))
            if refused:
                raise UnsupportedOpError(f"{mg.path or 'model'}: no inverse rule on the data path "
                                         f"for: {'; '.join(refused)}")
        return chosen

    def _class_record(self, scores: torch.Tensor, index: int) -> dict:
        def label(i):
            return self.labels[i] if self.labels and i < len(self.labels) else None
        probs = torch.softmax(scores[0].double(), 0)
        return {"kind": "class", "index": index, "label": label(index),
                "score": float(scores[0, index]), "probability": float(probs[index]),
                "top5": [{"index": int(i), "score": float(scores[0, i]), "label": label(int(i))}
                         for i in scores[0].argsort(descending=True)[:5]]}

    def backproject(self, point: Point, damp: float | None = None, progress=None,
                    stream: tuple[str, ...] = ()) -> BPFMResult:
        """Stage 2: the BPFM of every chosen layer at damping ``damp`` (default: the analyzer's).
        The result is not checked: ``.check()`` raises if the solve diverged. ``stream``: the
        maps by these methods are taken as the walk goes back, and each BPFM is dropped as
        soon as the walk is past it (``BPFMResult.maps``; its ``bpfm`` is then empty): the
        memory of one analysis then holds the BPFMs of about one segment, not of the network."""
        self._load_cache()
        opts = self.opts if damp is None else replace(self.opts, damp=float(damp))
        stream = tuple(dict.fromkeys(stream))
        for m in stream:
            _check_methods(m)
        if point.batch is not None:
            solved = self._solve_batch(point.batch, opts, progress, stream)
            b = point.index
            return BPFMResult({t: v[b:b + 1] for t, v in solved.bpfm.items()},
                              records_of_image(solved.records, b), opts.damp, solved.seconds,
                              maps={m: {t: v[b:b + 1] for t, v in ms.items()}
                                    for m, ms in solved.maps.items()} if stream else None,
                              nonfinite=solved.nonfinite[b] if stream else None)
        t0 = time.perf_counter()
        opts = replace(opts, point_memo=point.sigmas)
        taker = _MapTaker(point.env, point.Lambda, set(point.layers), stream, 1) if stream else None
        bpfm, records = backproject(self.graph, point.plan, point.env, point.Lambda, opts, progress,
                                    set(point.layers), release=taker)
        self._save_cache()
        return BPFMResult(bpfm, records, opts.damp, time.perf_counter() - t0,
                          maps=taker.maps if taker else None,
                          nonfinite=taker.nonfinite[0] if taker else None)

    def _solve_batch(self, batch: _Batch, opts: SolverOptions, progress=None,
                     stream: tuple[str, ...] = ()) -> "_Solved":
        """The back-projection of a whole batch at one damping, once (its points share it)."""
        key = (opts.damp, stream)
        opts = replace(opts, point_memo=batch.sigmas)
        if key not in batch.solved:
            t0 = time.perf_counter()
            taker = _MapTaker(batch.env, batch.Lambda, set(batch.layers), stream,
                              batch.images) if stream else None
            bpfm, records = backproject(self.graph, batch.plan, batch.env, batch.Lambda, opts,
                                        progress, set(batch.layers), release=taker)
            batch.solved[key] = _Solved(bpfm, records, (time.perf_counter() - t0) / batch.images,
                                        taker.maps if taker else {},
                                        taker.nonfinite if taker else [[]] * batch.images)
            self._save_cache()
        return batch.solved[key]

    def _load_cache(self) -> None:
        """The cached solver memo entries, once, before the first solve."""
        if self._cached_keys is None:
            if self.cache is not None:
                self.opts.cache.update(cache_mod.load_solver_memo(
                    self.cache, self.graph, self.device, self.opts.power_iter))
            self._cached_keys = set(self.opts.cache)

    def _save_cache(self) -> None:
        """The solver memo into the cache when it gained entries (once per new entry set)."""
        if self.cache is not None and not set(self.opts.cache) <= self._cached_keys:
            self._cached_keys = set(self.opts.cache)
            cache_mod.save_solver_memo(self.cache, self.graph, self.opts.cache, self.device,
                                       self.opts.power_iter)

    @staticmethod
    def maps(point: Point, method: str, bpfm: BPFMResult | None = None) -> dict[str, np.ndarray]:
        """Stage 3: the raw map (float32 H×W) of every chosen layer by ``method``; ``naflow``
        needs the ``backproject`` result."""
        _check_methods(method)
        if method in NEEDS_BPFM and bpfm is None:
            raise NAFlowError(f"method '{method}' needs the back-projection (Analyzer.backproject)")
        if bpfm is not None and bpfm.maps and method in bpfm.maps:
            return {t: bpfm.maps[method][t][0].float().cpu().numpy() for t in point.layers}
        if method in NEEDS_BPFM and bpfm is not None and bpfm.maps is not None:
            raise NAFlowError(f"this back-projection kept no BPFM (stream={tuple(bpfm.maps)}): "
                              f"give method '{method}' to backproject(stream=...)")
        env, lam = point.env, point.Lambda
        b = bpfm.bpfm if bpfm is not None else {}
        return {t: layer_map(method, env[t], lam[t], b.get(t))[0].float().cpu().numpy()
                for t in point.layers}

    def layer_records(self, point: Point, records: dict | None = None) -> list[Layer]:
        """The chosen layers of ``point`` in forward order (with their solver records)."""
        records = records or {}
        out = []
        for i, t in enumerate(point.layers):
            node = self.graph.node_of(t)
            out.append(Layer(index=i, tensor=t, node=node.name, op_type=node.op_type,
                             shape=list(point.env[t].shape), segment=point.plan.segment_of.get(t),
                             final=t in point.plan.finals, solver=records.get(t)))
        return out

    def flow(self, point: Point, method: str = "naflow", bpfm: BPFMResult | None = None,
             compare: str | None = None, keep_tensors: bool = False) -> Flow:
        """Stage 4: the ``Flow`` of ``point`` (maps by ``method`` and ``compare``)."""
        mg, pl = self.graph, point.plan
        maps = self.maps(point, method, bpfm)
        compare_maps = self.maps(point, compare, bpfm) if compare else {}
        timings = {**point.timings, "bpfm_s": bpfm.seconds if bpfm is not None else 0.0}
        timings["total_s"] = sum(timings.values())
        image = point.image
        return Flow(
            model={"path": str(mg.path) if mg.path else None, "sha256": mg.sha256, "opset": mg.opset,
                   "input": mg.input_name, "input_shape": point.input_shape, "output": mg.output_name,
                   "score_tensor": point.score_tensor, "feature_layers": len(pl.features),
                   "segments": len(pl.segments), "final_tensor": pl.final,
                   **({"final_tensors": list(pl.finals)} if len(pl.finals) > 1 else {})},
            input={"path": str(image) if isinstance(image, (str, Path)) else None, "note": point.note,
                   "size": list(point.view.shape[:2])},
            preprocess=self.preprocess.as_dict(), target=point.target, method=method,
            layers=self.layer_records(point, bpfm.records if bpfm is not None else None),
            maps=maps, image=point.view, parity=point.parity, timings=timings,
            options={"damp": bpfm.damp if bpfm is not None else self.opts.damp,
                     "conv_inverse": self.opts.conv_inverse,
                     "tol": self.opts.tol, "max_iter": self.opts.max_iter,
                     "provider": self.capture.provider, "device": str(self.device),
                     "layers": point.layer_spec or "all",
                     "batch": point.batch.images if point.batch is not None else 1},
            skipped=dict(pl.skipped), coverage=dict(pl.coverage), compare=compare,
            compare_maps=compare_maps, tensors=Tensors(A={t: point.env[t] for t in pl.data}, Lambda=point.Lambda,
                            BPFM=bpfm.bpfm if bpfm is not None else {}, plan=pl, env=point.env)
            if keep_tensors else None)

    def analyze(self, image, target=None, method: str = "naflow", compare: str | None = None,
                layers: str | None = None, objective=None, progress=None,
                keep_tensors: bool = False) -> Flow:
        """The composition of the stages: ``prepare``, ``backproject`` (when ``method`` or
        ``compare`` needs it; a diverged solve raises), ``flow`` (``analyze_many`` of one
        image)."""
        return self.analyze_many([image], target=[target], method=method, compare=compare,
                                 layers=layers, objective=[objective], batch=1, progress=progress,
                                 keep_tensors=keep_tensors)[0]

    def prepare_many(self, images, target=None, objective=None, layers: str | None = None,
                     bpfm: bool = True) -> list[Point]:
        """Stage 1 for several images at once: one forward pass (onnxruntime and torch) and one
        backward pass for all of them; one ``Point`` per image. ``target`` and ``objective`` are
        one for every image or a list with one per image. Images are prepared one by one
        instead where a batch cannot be formed: a similarity or detection objective, the
        reference or paper solver, images of different input sizes, or a model whose batch
        dimension is fixed or mixes images (onnxruntime refuses the batch, or the batch's first
        scores differ from the first image's alone)."""
        images = list(images)
        targets = _per_image("target", target, len(images))
        objectives = _per_image("objective", objective, len(images))

        def one_by_one():
            return [self.prepare(im, target=t, objective=o, layers=layers, bpfm=bpfm)
                    for im, t, o in zip(images, targets, objectives)]
        if (len(images) < 2 or any(o is not None for o in objectives) or self.opts.reference
                or self.opts.conv_inverse != "lsq"):
            return one_by_one()
        loaded = [pp_mod.load_image(im, self.preprocess.size, self.max_image_pixels,
                                    self.preprocess.resize) for im in images]
        xs = [self.preprocess.to_input(view) for view, _ in loaded]
        batch = self._batched_forward(xs) if len({x.shape for x in xs}) == 1 else None
        if batch is None:
            return one_by_one()
        values, par, timings = batch
        mg, n = self.graph, len(images)
        pl = self.plan_for(values)
        if any(values[t].shape[0] != n for t in pl.data if isinstance(values.get(t), torch.Tensor)):
            return one_by_one()   # a data tensor whose dim 0 is not the image
        chosen = self._chosen(pl, layers, bpfm)
        scores = scores_of(values, mg.score_name).detach()
        t0 = time.perf_counter()
        index = [resolve_class(t, scores[b:b + 1], self.labels) for b, t in enumerate(targets)]
        rows = torch.arange(n, device=scores.device)
        pick = torch.tensor(index, device=scores.device)
        lam = importance(values, lambda v: scores_of(v, mg.score_name)[rows, pick].sum(), pl.data)
        timings["importance_s"] = time.perf_counter() - t0
        timings = {k: v / n for k, v in timings.items()}          # each image's share
        env = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        shared = _Batch(env=env, Lambda=lam, plan=pl, layers=chosen, images=n)
        points = []
        for b, (im, (view, note)) in enumerate(zip(images, loaded)):
            points.append(Point(
                image=im, view=view, note=note, input_shape=[1] + list(xs[b].shape[1:]),
                env={t: env[t][b:b + 1] for t in pl.data if isinstance(env.get(t), torch.Tensor)},
                plan=pl, Lambda={t: v[b:b + 1] for t, v in lam.items()},
                target=self._class_record(scores[b:b + 1], index[b]),
                score_tensor=mg.score_name, parity=par[b], timings=dict(timings), layers=chosen,
                layer_spec=layers, batch=shared, index=b))
        return points

    def _batched_forward(self, xs: list[np.ndarray]):
        """The forward pass of the stacked inputs, or None where this model cannot run them as a
        batch (a fixed batch dimension, or images that do not stay apart)."""
        x = np.concatenate(xs, axis=0)
        try:
            values, par, timings = self.forward(x)
        except Exception:   # noqa: BLE001 - onnxruntime or the rebuild refused the batch
            return None
        first = self.capture.run(xs[0], [self.graph.score_name])[self.graph.score_name]
        got = values[self.graph.score_name][:1].detach().float().cpu().numpy()
        if got.shape != first.shape or not np.allclose(got, first, rtol=1e-3,
                                                       atol=1e-4 * float(np.abs(first).max() + 1)):
            return None
        return values, par, timings

    def backproject_many(self, points: list[Point], damp: float | None = None,
                         progress=None, stream: tuple[str, ...] = ()) -> list[BPFMResult]:
        """Stage 2 for points of ``prepare_many``: the points of one batch are solved together
        on the batched operator, each image to its own convergence (an image that has converged
        leaves the batch); others one by one. One ``BPFMResult`` per point (unchecked);
        ``stream`` as in ``backproject``."""
        return [self.backproject(p, damp, progress, stream) for p in points]

    def analyze_many(self, images, target=None, method: str = "naflow", compare: str | None = None,
                     layers: str | None = None, objective=None, batch: int = 8, progress=None,
                     keep_tensors: bool = False) -> list[Flow]:
        """Several images, ``batch`` at a time: one forward and backward per batch, the
        back-projection solved on the batched operator with per-image convergence
        (``prepare_many``, ``backproject_many``). ``target`` and ``objective`` are one for every
        image or a list with one per image. The flows equal ``[analyze(image) for image in
        images]`` within the solver tolerance; a diverged solve raises, as in ``analyze``."""
        images = list(images)
        targets = _per_image("target", target, len(images))
        objectives = _per_image("objective", objective, len(images))
        if batch < 1:
            raise NAFlowError(f"batch must be >= 1, got {batch}")
        for m in filter(None, (method, compare)):
            _check_methods(m)
        needs_bpfm = method in NEEDS_BPFM or compare in NEEDS_BPFM
        # without tensors kept, the maps are taken as the walk goes back and the BPFMs dropped
        stream = () if keep_tensors else tuple(filter(None, (method, compare)))
        flows = []
        for at in range(0, len(images), batch):
            part = slice(at, at + batch)
            points = self.prepare_many(images[part], target=targets[part],
                                       objective=objectives[part], layers=layers, bpfm=needs_bpfm)
            results = self.backproject_many(points, progress=progress, stream=stream) \
                if needs_bpfm else [None] * len(points)
            for point, res in zip(points, results):
                flows.append(self.flow(point, method, res.check() if res is not None else None,
                                       compare=compare, keep_tensors=keep_tensors))
            for point in points:          # the batch's tensors go with its last flow
                point.batch = None
        return flows


def _per_image(what: str, value, n: int) -> list:
    """One value for every image, or a list with one per image."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise NAFlowError(f"{n} images but {len(values)} values of {what}")
    return values


def analyze(model, image, target=None, method: str = "naflow", **options) -> Flow:
    """One-call API: ``naflow_onnx.analyze("model.onnx", "cat.jpg")`` -> ``Flow``. ``options``
    are ``Analyzer``'s and ``Analyzer.analyze``'s (``compare``, ``layers``, ``objective``,
    ``progress``, ``keep_tensors``)."""
    per_image = {k: options.pop(k) for k in ("compare", "layers", "objective", "progress",
                                             "keep_tensors") if k in options}
    return Analyzer(model, **options).analyze(image, target=target, method=method, **per_image)
