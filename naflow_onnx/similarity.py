"""Similarity-metric targets (METHOD.md §6, paper Section III-C, Eq. 17-21).

A model whose output is an embedding decides by cosine similarity. For a query embedding V_Q and
a reference V_S (a support image, a gallery match, a class prototype), both taken before any
L2 normalisation:

    omega_d = V_Q[d] V_S[d] / |sum_k V_Q[k] V_S[k]|            (sums to +1 or -1)
    Lambda  = d(sum_d omega_d) / dA   with the denominator held constant

Holding the denominator constant is essential: otherwise sum_d omega_d is the constant +-1 and
every gradient vanishes. V_S is a constant (detached).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import NAFlowError, TargetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def omega(v_q: np.ndarray, v_s: np.ndarray) -> np.ndarray:
    """The channel contribution weights (Eq. 17); they sum to +1 or -1."""
    v_q, v_s = np.asarray(v_q, np.float64).ravel(), np.asarray(v_s, np.float64).ravel()
    dot = float(v_q @ v_s)
    if dot == 0.0:
        raise TargetError("the query and reference embeddings are orthogonal: omega is undefined")
    return v_q * v_s / abs(dot)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@dataclass
class SimilarityObjective:
    """y = sum_d omega_d, differentiable in V_Q with |V_Q . V_S| held constant."""

    score_name: str
    reference: np.ndarray                 # V_S
    description: str = "reference"
    details: dict = field(default_factory=dict)
    _last: dict = field(default_factory=dict, repr=False)

    def __call__(self, values: dict) -> torch.Tensor:
        v_q = values[self.score_name].reshape(values[self.score_name].shape[0], -1)
        v_s = torch.as_tensor(self.reference, dtype=v_q.dtype, device=v_q.device).reshape(1, -1)
        if v_q.shape[1] != v_s.shape[1]:
            raise TargetError(f"reference embedding has {v_s.shape[1]} dims, the model's embedding "
                              f"'{self.score_name}' has {v_q.shape[1]}")
        dot = (v_q * v_s).sum(1, keepdim=True)
        denom = dot.detach().abs()          # held constant (METHOD.md §6)
        if torch.any(denom == 0):
            raise TargetError("the query and reference embeddings are orthogonal")
        w = v_q * v_s / denom
        q = v_q.detach().cpu().numpy()[0]
        self._last = {"omega": w.detach().cpu().numpy()[0], "dot": float(dot.detach()[0]),
                      "cosine": cosine(q, self.reference)}
        return w.sum()

    def record(self) -> dict:
        w = self._last.get("omega")
        return {"kind": "similarity", "description": self.description,
                "cosine": self._last.get("cosine"), "dot": self._last.get("dot"),
                "omega_sum": float(w.sum()) if w is not None else None,
                "omega": [float(v) for v in w] if w is not None else None, **self.details}


def image_files(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise NAFlowError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NAFlowError(f"no images in {folder}")
    return files


def load_prototypes(path) -> dict[str, np.ndarray]:
    """An .npz of class prototypes: one array per class (key = class name), or the arrays
    ``prototypes`` [K, D] with ``names`` [K]."""
    path = Path(path)
    if not path.is_file():
        raise NAFlowError(f"prototypes file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise NAFlowError(f"{path}: not a readable .npz ({type(exc).__name__})") from None
    if "prototypes" in data.files:
        protos = data["prototypes"]
        names = [str(n) for n in data["names"]] if "names" in data.files else [str(i) for i in range(len(protos))]
        return {n: np.asarray(p, np.float64).ravel() for n, p in zip(names, protos)}
    return {k: np.asarray(data[k], np.float64).ravel() for k in data.files}


def rank(query: np.ndarray, candidates: dict[str, np.ndarray]) -> list[dict]:
    """Candidates sorted by cosine similarity to the query, best first."""
    rows = [{"name": k, "cosine": cosine(query, v)} for k, v in candidates.items()]
    return sorted(rows, key=lambda r: -r["cosine"])


SIMILARITY_MODES = ("reference", "support", "gallery", "prototypes")


@dataclass
class SimilarityTarget:
    """What a similarity decision is explained against: ``mode`` ``reference`` (``source``: one
    image), ``support`` (a folder of one image per class, file stem = class), ``gallery`` (a
    folder of images; the top-1 match) or ``prototypes`` (an .npz of class embeddings);
    ``target`` names a class of support/gallery/prototypes instead of the top-1 (None or
    "top1"); ``top_k``: the ranking length recorded."""

    mode: str
    source: str | Path
    target: str | None = None
    top_k: int = 5

    def __post_init__(self):
        if self.mode not in SIMILARITY_MODES:
            raise NAFlowError(f"unknown similarity mode '{self.mode}' (choose from "
                              f"{', '.join(SIMILARITY_MODES)})")


def similarity_flows(analyzer, image, similarity: SimilarityTarget, method: str = "naflow",
                     compare: str | None = None, layers: str | None = None, progress=None):
    """Query and reference flows of a similarity decision (METHOD.md §6, paper Fig. 10-12):
    ``(flow of image, flow of the reference image or None for a prototype)``."""
    mode, source = similarity.mode, similarity.source
    query = analyzer.embed(image)
    ranking, ref_image, ref_vec = None, None, None
    if mode == "reference":
        ref_image = Path(source)
        ref_vec, chosen = analyzer.embed(ref_image), ref_image.name
    else:
        if mode == "prototypes":
            candidates = load_prototypes(source)
            files = {}
        else:
            paths = image_files(source)
            key = (lambda p: p.stem) if mode == "support" else (lambda p: p.name)
            files = {key(p): p for p in paths}
            candidates = {k: analyzer.embed(p) for k, p in files.items()}
        ranking = rank(query, candidates)
        chosen = ranking[0]["name"]
        if similarity.target not in (None, "top1"):
            if similarity.target not in candidates:
                raise TargetError(f"target '{similarity.target}' is not among the {mode} classes "
                                  f"({', '.join(sorted(candidates)[:8])}...)")
            chosen = similarity.target
        ref_vec, ref_image = candidates[chosen], files.get(chosen)
    details = {"mode": mode, "prediction": ranking[0]["name"] if ranking else chosen,
               "reference": chosen, "ranking": ranking[: similarity.top_k] if ranking else None}
    objective = analyzer.similarity_objective(ref_vec, description=str(chosen), **details)
    flow = analyzer.analyze(image, method=method, compare=compare, layers=layers,
                            objective=objective, progress=progress)
    partner = None
    if ref_image is not None:
        back = analyzer.similarity_objective(query, description=f"query {Path(image).name}",
                                             mode=mode, side="reference")
        partner = analyzer.analyze(ref_image, method=method, layers=layers, objective=back)
    return flow, partner
