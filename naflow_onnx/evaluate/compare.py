"""Compare variants across several ``naflow evaluate`` outputs (e.g. the damping sweep).

    python -m naflow_onnx.evaluate.compare OUT1 OUT2 ... [--stage "all internal"] [--markdown]

For every output folder and metric it ranks the variants on the stage's value (1 = best,
by the metric's direction; ties share the mean rank), then averages the ranks over folders
and metrics. The variant with the lowest mean rank "does best across the metrics". The
randomisation test is left out of the ranking (lower is better there, but it measures
weight-dependence, not quality) and shown separately.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

RANKED = ("energy", "pointing", "deletion", "insertion")


def _rank(values: dict[str, float], higher: bool) -> dict[str, float]:
    names = [k for k, v in values.items() if v is not None and math.isfinite(v)]
    arr = np.array([values[k] for k in names], float)
    key = -arr if higher else arr
    order = np.argsort(key, kind="stable")
    ranks = np.empty(len(names))
    ranks[order] = np.arange(1, len(names) + 1)
    for v in np.unique(key):           # ties: mean rank
        sel = key == v
        ranks[sel] = ranks[sel].mean()
    return dict(zip(names, ranks.tolist()))


def compare(docs: list[dict], stage: str = "all internal") -> dict:
    tables = {}
    ranks: dict[str, list[float]] = {}
    for doc in docs:
        name = doc["model"]["name"]
        for metric in RANKED:
            row = {v: (t[stage] if t[stage] is not None else float("nan"))
                   for v, t in doc["stages"][metric].items()}
            tables.setdefault(metric, {})[name] = row
            for v, r in _rank(row, doc["higher_is_better"][metric]).items():
                ranks.setdefault(v, []).append(r)
    mean_rank = {v: float(np.mean(r)) for v, r in ranks.items()}
    best = min(mean_rank, key=mean_rank.get)
    return {"stage": stage, "tables": tables, "mean_rank": mean_rank, "best": best}


def markdown(result: dict) -> str:
    lines = []
    variants = list(result["mean_rank"])
    for metric, per_model in result["tables"].items():
        lines += [f"**{metric}** ({result['stage']})", "", "| model | " + " | ".join(variants) + " |",
                  "| --- |" + " --- |" * len(variants)]
        for model, row in per_model.items():
            lines.append(f"| {model} | " + " | ".join(f"{row.get(v, float('nan')):.3f}" for v in variants) + " |")
        lines.append("")
    lines += ["**mean rank** (1 = best)", "", "| " + " | ".join(variants) + " |", "|" + " --- |" * len(variants),
              "| " + " | ".join(f"{result['mean_rank'][v]:.2f}" for v in variants) + " |", "",
              f"best: **{result['best']}**"]
    return "\n".join(lines)


if __name__ == "__main__":   # the command lives in evaluate.cli
    from naflow_onnx.evaluate.cli import compare_main
    sys.exit(compare_main())
