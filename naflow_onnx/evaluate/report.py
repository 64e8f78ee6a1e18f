"""Aggregate per-image evaluation results into tables, files and plots.

Files written by ``naflow evaluate --out DIR`` (schema ``naflow-onnx/evaluation`` v1):

* ``evaluation.json`` - model, data set, options, layers (index, tensor, op type, shape,
  depth in [0, 1], stage), variants, per variant and metric the per-layer mean / std / count,
  the stage table, the randomisation cascade, solver convergence, failures and timings.
* ``metrics.csv`` - one row per (variant, layer, metric): ``variant, method, damp,
  layer_index, tensor, op_type, depth, stage, metric, mean, std, n``.
* ``per_image.npz`` - ``scores`` float64 [images, variants, layers, 4] (metric order
  ``metrics``), ``randomisation`` float64 [images, cascade steps, variants, layers] (NaN
  where not computed), ``image_index``, ``target``, ``label`` (-1 unknown), ``predicted``,
  ``probability``, and the name lists ``variants``, ``tensors``, ``metrics``, ``cascade_k``.
* ``metrics.png`` - one panel per metric (and the randomisation test at the full cascade):
  the metric against layer depth, one line per variant, stage boundaries dotted.
* ``summary.md`` - the stage tables as Markdown.

Stages: the feature layers in forward order are cut into thirds: *early* = the first third,
*middle* = the second, *late* = the rest except the final layer, *final* = the final layer
(the one whose map equals Grad-CAM). A stage's value is the mean over images of the mean over
its layers (NaNs - maps with no positive mass - left out).
"""
from __future__ import annotations

import csv
import io
import json
import math
import warnings

import numpy as np

from .task import METRICS

STAGES = ("early", "middle", "late", "final")
HIGHER_IS_BETTER = {"energy": True, "pointing": True, "deletion": False, "insertion": True,
                    "randomisation": False}
LABELS = {"energy": "energy inside the mask (↑)", "pointing": "pointing game (↑)",
          "deletion": "deletion AUC (↓)", "insertion": "insertion AUC (↑)",
          "randomisation": "Spearman to fully randomised model (↓)"}


def stage_of(n_layers: int, final_index: int) -> list[str]:
    third = n_layers // 3
    out = []
    for j in range(n_layers):
        if j == final_index:
            out.append("final")
        elif j < third:
            out.append("early")
        elif j < 2 * third:
            out.append("middle")
        else:
            out.append("late")
    return out


def _nanmean(a, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _nanstd(a, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(a, axis=axis)


def _clean(x):
    """JSON-safe: NaN -> None, numpy -> python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


class Evaluation:
    """Per-image results (dicts from ``EvaluationTask``) gathered into arrays."""

    def __init__(self, results: list[dict], variants, failures: list[dict], meta: dict,
                 cascade: list[tuple[int, str]]):
        self.results = sorted(results, key=lambda r: r["index"])
        self.variants = variants
        self.failures = failures
        self.meta = meta
        self.cascade = cascade
        first = self.results[0]
        self.tensors = first["tensors"]
        for r in self.results:
            if r["tensors"] != self.tensors:
                raise ValueError(f"image {r['name']} has different feature layers from {first['name']}")
        self.layers = first["layers"]
        L = len(self.tensors)
        final = next((j for j, la in enumerate(self.layers) if la["final"]), L - 1)
        self.stages = stage_of(L, final)
        self.depth = [j / max(L - 1, 1) for j in range(L)]
        self.scores = np.stack([r["scores"] for r in self.results])            # [N, V, L, 4]
        K = len(cascade)
        self.randomisation = np.full((len(self.results), K, len(variants), L), np.nan)
        for i, r in enumerate(self.results):
            if r["randomisation"] is not None:
                self.randomisation[i] = r["randomisation"]
        self.n_randomised = int(sum(r["randomisation"] is not None for r in self.results))

    # ------------------------------------------------------------------ tables
    def per_layer(self, metric: str) -> dict[str, dict]:
        """{variant: {"mean": [L], "std": [L], "n": [L]}}."""
        if metric == "randomisation":
            a = self.randomisation[:, -1] if self.randomisation.shape[1] else np.full(
                (len(self.results), len(self.variants), len(self.tensors)), np.nan)
        else:
            a = self.scores[..., METRICS.index(metric)]
        return {v.name: {"mean": _nanmean(a[:, i], 0), "std": _nanstd(a[:, i], 0),
                         "n": np.isfinite(a[:, i]).sum(0)} for i, v in enumerate(self.variants)}

    def stage_table(self, metric: str) -> dict[str, dict[str, float]]:
        if metric == "randomisation":
            a = self.randomisation[:, -1] if self.randomisation.shape[1] else None
        else:
            a = self.scores[..., METRICS.index(metric)]
        out = {}
        for i, v in enumerate(self.variants):
            row = {}
            for s in STAGES:
                cols = [j for j, st in enumerate(self.stages) if st == s]
                if a is None or not cols:
                    row[s] = float("nan")
                    continue
                per_image = _nanmean(a[:, i][:, cols], 1)       # mean over the stage's layers
                row[s] = float(_nanmean(per_image))
            row["all internal"] = float(_nanmean(_nanmean(a[:, i][:, [j for j, st in enumerate(self.stages)
                                                                        if st != "final"]], 1))) if a is not None else float("nan")
            out[v.name] = row
        return out

    def metrics_list(self) -> list[str]:
        return list(METRICS) + (["randomisation"] if self.n_randomised else [])

    def solver(self) -> dict:
        out = {}
        for v in self.variants:
            recs = [r["solver"][v.name] for r in self.results if v.name in r["solver"]]
            if recs:
                out[v.name] = {"max_convergence": max(x["max_convergence"] for x in recs),
                               "mean_iterations": float(np.mean([x["iterations"] for x in recs])),
                               "all_converged": all(x["all_converged"] for x in recs),
                               "diverged_images": sum("error" in x for x in recs)}
        return out

    def accuracy(self) -> float | None:
        pairs = [(r["predicted"], r["label"]) for r in self.results if r["label"] is not None]
        return float(np.mean([p == y for p, y in pairs])) if pairs else None

    # ------------------------------------------------------------------ outputs
    def to_json(self) -> dict:
        return _clean({
            "schema": "naflow-onnx/evaluation", "schema_version": 1, **self.meta,
            "metrics": self.metrics_list(),
            "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in self.metrics_list()},
            "variants": [v.as_dict() for v in self.variants],
            "layers": [dict(index=j, depth=self.depth[j], stage=self.stages[j], **la)
                       for j, la in enumerate(self.layers)],
            "images": {"evaluated": len(self.results), "failed": len(self.failures),
                       "randomised": self.n_randomised, "accuracy": self.accuracy(),
                       "mean_mask_fraction": float(np.mean([r["mask_fraction"] for r in self.results]))},
            "per_layer": {m: self.per_layer(m) for m in self.metrics_list()},
            "stages": {m: self.stage_table(m) for m in self.metrics_list()},
            "randomisation": {
                "cascade": [{"k": k, "top_randomised_node": n} for k, n in self.cascade],
                "mean_spearman": _nanmean(self.randomisation, 0) if self.n_randomised else None},
            "solver": self.solver(),
            "failures": self.failures,
            "seconds": {"per_image_mean": float(np.mean([sum(r["seconds"].values()) for r in self.results]))},
        })

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["variant", "method", "damp", "layer_index", "tensor", "op_type", "depth", "stage",
                    "metric", "mean", "std", "n"])
        for m in self.metrics_list():
            table = self.per_layer(m)
            for v in self.variants:
                d = v.as_dict()
                for j, t in enumerate(self.tensors):
                    mean, std = table[v.name]["mean"][j], table[v.name]["std"][j]
                    w.writerow([v.name, v.method, "" if d["damp"] is None else d["damp"], j, t,
                                self.layers[j]["op_type"], f"{self.depth[j]:.4f}", self.stages[j], m,
                                "" if not np.isfinite(mean) else f"{mean:.6g}",
                                "" if not np.isfinite(std) else f"{std:.6g}", int(table[v.name]["n"][j])])
        return buf.getvalue()

    def npz_arrays(self) -> dict:
        return {"scores": self.scores, "randomisation": self.randomisation,
                "image_index": np.array([r["index"] for r in self.results], np.int64),
                "target": np.array([r["target"] for r in self.results], np.int64),
                "label": np.array([-1 if r["label"] is None else r["label"] for r in self.results], np.int64),
                "predicted": np.array([r["predicted"] for r in self.results], np.int64),
                "probability": np.array([r["probability"] for r in self.results], np.float64),
                "variants": np.array([v.name for v in self.variants]),
                "tensors": np.array(self.tensors), "metrics": np.array(METRICS),
                "cascade_k": np.array([k for k, _ in self.cascade], np.int64)}

    def markdown(self, metrics=None) -> str:
        lines = []
        for m in metrics or self.metrics_list():
            lines += [f"### {LABELS[m]}", "", "| variant | " + " | ".join(STAGES) + " | all internal |",
                      "| --- |" + " --- |" * (len(STAGES) + 1)]
            for name, row in self.stage_table(m).items():
                lines.append(f"| {name} | " + " | ".join("–" if not math.isfinite(row[s]) else f"{row[s]:.3f}"
                                                         for s in (*STAGES, "all internal")) + " |")
            lines.append("")
        return "\n".join(lines)

    def figure(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ms = self.metrics_list()
        cols = 3
        rows = math.ceil(len(ms) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
        x = np.arange(len(self.tensors))
        bounds = [j for j in range(1, len(self.stages)) if self.stages[j] != self.stages[j - 1]]
        for ax, m in zip(axes.ravel(), ms):
            table = self.per_layer(m)
            styles = ["-", "--", "-.", ":"]
            for i, v in enumerate(self.variants):   # styles vary so coinciding lines stay visible
                ax.plot(x, table[v.name]["mean"], marker=".", ms=3, lw=1.4, ls=styles[i % len(styles)],
                        label=v.name)
            for b in bounds:
                ax.axvline(b - 0.5, color="0.7", ls=":", lw=0.8)
            ax.set_title(LABELS[m], fontsize=10)
            ax.set_xlabel("feature layer (forward order)")
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(ms):]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=7)
        name = self.meta.get("model", {}).get("name", "")
        fig.suptitle(f"{name}: {len(self.results)} images ({self.meta.get('dataset', {}).get('kind', '')})",
                     fontsize=11)
        fig.tight_layout()
        return fig

    def write(self, directory) -> None:
        """Everything into ``directory`` (already a temporary folder of ``atomic_dir``)."""
        import matplotlib.pyplot as plt

        from pathlib import Path
        d = Path(directory)
        (d / "evaluation.json").write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        (d / "metrics.csv").write_text(self.csv_text())
        np.savez_compressed(d / "per_image.npz", **self.npz_arrays())
        (d / "summary.md").write_text(self.markdown() + "\n")
        fig = self.figure()
        fig.savefig(d / "metrics.png", dpi=110)
        plt.close(fig)
