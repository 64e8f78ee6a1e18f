"""One image of ``naflow evaluate``: every layer's map by every method, scored against the mask.

``EvaluationTask`` is picklable (paths and options only); ``setup()`` loads the model once per
worker (the analyzer, a batched onnxruntime session for the deletion/insertion curves, and the
cascade of randomised models), ``task(item)`` evaluates one image. A *variant* is a method at
one setting: ``naflow`` at the analyzer's damping, or ``naflow@t=0.1`` etc. with ``--damps``.

Per variant and layer it computes (``metrics`` has the definitions):
energy inside the mask, pointing game, deletion AUC, insertion AUC; and, for the first
``randomise_images`` images, the Spearman rank correlation between the map and the map of the
same image and class from models whose top ``k`` weight-bearing layers are randomised
(Adebayo et al. 2018, cascading).

The class probability the curves follow is the softmax of the model's score tensor (the
pre-softmax tensor the analysis explains), evaluated on batches of perturbed images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..backends import Task

METRICS = ("energy", "pointing", "deletion", "insertion")


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    damp: float | None = None      # naflow only; None = the analyzer's

    def as_dict(self) -> dict:
        return {"name": self.name, "method": self.method,
                "damp": None if self.damp is None else ("inf" if math.isinf(self.damp) else self.damp)}


def variants_of(methods: list[str], damps: list[float] | None) -> list[Variant]:
    out = []
    for m in methods:
        if m == "naflow" and damps:
            out += [Variant(f"naflow@t={'inf' if math.isinf(t) else f'{t:g}'}", "naflow", t) for t in damps]
        else:
            out.append(Variant(m, m))
    return out


class BatchProbability:
    """Softmax probability of one class for a batch of uint8 views, with onnxruntime.

    The session outputs only the score tensor, with the batch dimension made symbolic when the
    graph allows it (otherwise images run one at a time)."""

    def __init__(self, graph, preprocess, threads: int = 1):
        import onnx
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(graph.model)
        del m.graph.value_info[:]
        score = graph.score_name
        del m.graph.output[:]
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(score))
        inp = next(i for i in m.graph.input if i.name == graph.input_name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.preprocess = preprocess
        self.input = graph.input_name
        self.batched = False
        dims = inp.type.tensor_type.shape.dim
        fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        if fixed is not None:
            dims[0].dim_param = "N"
        try:
            self.session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            probe = np.zeros((2,) + tuple(max(d.dim_value, 1) for d in dims[1:]), np.float32)
            self.session.run(None, {self.input: probe})
            self.batched = True
        except Exception:  # a graph with the batch baked in (Reshape to [1, -1], ...)
            if fixed is not None:
                dims[0].dim_value = fixed
            self.session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.outputs = [score]

    def scores(self, views: np.ndarray) -> np.ndarray:
        x = self.preprocess.to_batch(np.asarray(views))
        if self.batched:
            s = self.session.run(self.outputs, {self.input: x})[0]
        else:
            s = np.concatenate([self.session.run(self.outputs, {self.input: x[i:i + 1]})[0]
                                for i in range(len(x))])
        return s.reshape(len(views), -1).astype(np.float64)

    def fn(self, target: int):
        def prob(views: np.ndarray) -> np.ndarray:
            s = self.scores(views)
            z = np.exp(s - s.max(1, keepdims=True))
            return z[:, target] / z.sum(1)
        return prob


@dataclass
class EvaluationTask(Task):
    model: str
    variants: list[Variant]
    analyzer_options: dict = field(default_factory=dict)
    layers: str | None = None
    steps: int = 20
    randomise_images: int = 0
    randomise_ks: list[int] = field(default_factory=list)
    randomise_seed: int = 0
    threads: int = 1

    # ---------------------------------------------------------------- per worker
    def setup(self) -> None:
        import torch

        from ..flow import Analyzer
        from ..randomise import randomise_onnx

        torch.set_num_threads(self.threads)
        self.analyzer = Analyzer(self.model, **self.analyzer_options)
        self.prob = BatchProbability(self.analyzer.graph, self.analyzer.preprocess, self.threads)
        self.randomised = []
        if self.randomise_images and self.randomise_ks:
            proto = self.analyzer.graph.model
            for k in self.randomise_ks:
                m, names = randomise_onnx(proto, k, self.randomise_seed)
                # a randomised copy is not the user's model: nothing of it goes to the cache
                self.randomised.append((k, names[-1], Analyzer(m, **{**self.analyzer_options,
                                                                     "cache": False})))

    # ---------------------------------------------------------------- per image
    def maps(self, analyzer, items) -> list[tuple[object, dict, dict]]:
        """Per item: the analysed point and ``{variant: {tensor: map}}`` (None where the
        back-projection diverged) plus the solver summary per naflow variant. Several items are
        prepared together (``prepare_many``) and back-projected together at each naflow damping
        (``backproject_many``)."""
        points = analyzer.prepare_many([it.image for it in items],
                                       target=[it.target for it in items], layers=self.layers)
        done = [(point, {}, {}) for point in points]
        for v in self.variants:
            bpfms = [None] * len(points)
            if v.method == "naflow":
                bpfms = analyzer.backproject_many(points, damp=v.damp)
            for (point, out, solver), bpfm in zip(done, bpfms):
                if bpfm is not None:
                    solver[v.name] = bpfm.solver_summary()
                    error = bpfm.error()
                    if error:                # this variant fails on this image; the others go on
                        solver[v.name]["error"] = error
                        out[v.name] = None
                        continue
                out[v.name] = analyzer.maps(point, v.method, bpfm)
        return done

    def __call__(self, item) -> dict:
        return self.run_batch([item])[0]

    def run_batch(self, items: list) -> list[dict]:
        """The items' results; the maps of the chunk (and of its randomised models) are computed
        together, the metrics per image. The seconds of a shared stage are split evenly among
        the chunk's images."""
        import time

        t0 = time.perf_counter()
        analysed = self.maps(self.analyzer, items)
        shared = (time.perf_counter() - t0) / len(items)
        results = []
        for item, (point, maps, solver) in zip(items, analysed):
            t1 = time.perf_counter()
            results.append(self._scores(item, point, maps, solver))
            results[-1]["seconds"] = {"maps_and_metrics": shared + time.perf_counter() - t1,
                                      "randomisation": 0.0}
        chosen = [j for j, item in enumerate(items)
                  if self.randomised and item.index < self.randomise_images]
        if chosen:
            t2 = time.perf_counter()
            for j in chosen:
                results[j]["randomisation"] = np.full(
                    (len(self.randomised), len(self.variants), len(results[j]["tensors"])), np.nan)
            for a, (_, _, analyzer_k) in enumerate(self.randomised):
                randomised = self.maps(analyzer_k, [items[j] for j in chosen])
                for j, (_, maps_k, _) in zip(chosen, randomised):
                    self._spearman(results[j]["randomisation"][a], analysed[j][1], maps_k,
                                   results[j]["tensors"])
            for j in chosen:
                results[j]["seconds"]["randomisation"] = (time.perf_counter() - t2) / len(chosen)
        return results

    def _scores(self, item, point, maps: dict, solver: dict) -> dict:
        """One image's result without its randomisation test: energy, pointing game, deletion
        and insertion AUC of every variant's map at every layer."""
        from . import metrics as M

        view = point.view
        mask = item.mask_for(view.shape[:2])
        target = int(point.target["index"])
        prob = self.prob.fn(target)
        tensors = point.layers
        V, L = len(self.variants), len(tensors)
        scores = np.full((V, L, len(METRICS)), np.nan)
        curves: dict[bytes, tuple[float, float]] = {}   # identical maps (e.g. reference and
        for i, v in enumerate(self.variants):           # layercam after a ReLU) share curves
            if maps[v.name] is None:                    # diverged: NaN scores, error in solver
                continue
            for j, t in enumerate(tensors):
                m = maps[v.name][t]
                scores[i, j, 0] = M.energy_in_mask(m, mask)
                scores[i, j, 1] = M.pointing_game(m, mask)
                key = m.tobytes()
                if key not in curves:
                    curves[key] = (
                        M.deletion_auc(prob, view, m, steps=self.steps, batch_size=self.steps + 1),
                        M.insertion_auc(prob, view, m, steps=self.steps, batch_size=self.steps + 1))
                scores[i, j, 2:4] = curves[key]
        top = point.target["top5"][0]["index"]
        return {"index": item.index, "name": item.name, "tensors": tensors,
                "layers": [{"tensor": la.tensor, "op_type": la.op_type, "shape": la.shape,
                            "final": la.final, "segment": la.segment}
                           for la in self.analyzer.layer_records(point)],
                "target": target, "label": item.label, "predicted": int(top),
                "probability": float(point.target["probability"]),
                "mask_fraction": float(mask.mean()), "scores": scores, "randomisation": None,
                "solver": solver, "seconds": {}}

    def _spearman(self, out: np.ndarray, maps: dict, maps_k: dict, tensors: list) -> None:
        """``out[variant, layer]``: the rank correlation of each map with the randomised model's."""
        from . import metrics as M

        for i, v in enumerate(self.variants):
            if maps[v.name] is None or maps_k[v.name] is None:
                continue
            for j, t in enumerate(tensors):
                out[i, j] = M.spearman(maps[v.name][t], maps_k[v.name][t])
