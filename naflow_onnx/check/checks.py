"""The measures behind ``naflow check`` and the baseline file (``docs/check.md`` defines each).

Every check returns a record ``{"check", "status", "value", "threshold", "message", ...}`` with
status ``pass``, ``fail`` or ``skip``; ``run.py`` collects them per image.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import stats
from ..methods import resize
from ..errors import NAFlowError

BASELINE_SCHEMA = "naflow-onnx/baseline"
BASELINE_VERSION = 1


class BaselineError(NAFlowError):
    """A baseline file that cannot be read or does not fit the model / the configuration."""


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# correlations


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally shaped maps for a gate (``stats.pearson``; a constant
    map has no direction: two constant maps correlate 1 when equal and 0 otherwise; one
    constant map correlates 0)."""
    return stats.gate_correlation(stats.pearson(a, b), a, b)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation for a gate: ``pearson`` of the average ranks (two constant maps
    have equal ranks: 1)."""
    return pearson(stats.rankdata(a), stats.rankdata(b))


# ------------------------------------------------------------------------------------------------
# maps


def to_grid(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A raw map brought to the grid ``size``: area average when the map is finer (every pixel of
    the grid is the mean of the map over its cell), bilinear when it is coarser."""
    import torch
    m = np.asarray(m, np.float32)
    if m.shape == tuple(size):
        return m
    t = torch.from_numpy(np.ascontiguousarray(m))[None, None]
    if m.shape[0] >= size[0] and m.shape[1] >= size[1]:
        return torch.nn.functional.adaptive_avg_pool2d(t, tuple(size))[0, 0].numpy()
    return resize(m, size).astype(np.float32)


def region_mask(expect, size: tuple[int, int], original_size: tuple[int, int] | None = None,
                where: str = "") -> np.ndarray | None:
    """The expected region as a boolean H×W mask at the network input (``size`` = (H, W)).

    A box is [x0, y0, x1, y1] in network-input pixels, x1 and y1 exclusive. A mask file is
    nonzero (> 127 after conversion to gray) inside the region; at the network-input size it is
    used as is, at the original image's size it goes through the image's resize and centre crop
    (nearest neighbour); any other size is refused."""
    from PIL import Image
    h, w = size
    if expect is None or (expect.box is None and expect.mask is None):
        return None
    if expect.box is not None:
        x0, y0, x1, y1 = expect.box
        if x1 > w or y1 > h:
            raise NAFlowError(f"{where}box {[int(v) if float(v).is_integer() else v for v in expect.box]} "
                              f"lies outside the network input ({w}×{h} pixels, W×H): the box is in "
                              "network-input pixels (after resize and centre crop)")
        mask = np.zeros((h, w), bool)
        mask[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = True
        return mask
    img = Image.open(expect.mask)
    gray = img.convert("L")
    if gray.size == (w, h):
        mask = np.asarray(gray) > 127
    elif original_size is not None and gray.size == tuple(original_size):
        sw, sh = gray.size
        scale = max(h / sh, w / sw)
        new = (max(w, round(sw * scale)), max(h, round(sh * scale)))
        big = gray.resize(new, Image.NEAREST)
        left, top = (big.width - w) // 2, (big.height - h) // 2
        mask = np.asarray(big.crop((left, top, left + w, top + h))) > 127
    else:
        raise NAFlowError(f"{where}mask {Path(expect.mask).name} is {gray.size[0]}×{gray.size[1]}: it "
                          f"must be the network-input size ({w}×{h}) or the image's size"
                          + (f" ({original_size[0]}×{original_size[1]})" if original_size else ""))
    if not mask.any():
        raise NAFlowError(f"{where}mask {Path(expect.mask).name} is empty (no pixel > 127)")
    return mask


def mass_in_region(raw: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's positive mass inside the region, the map bilinearly upsampled (not
    normalised) to the network input. 0 for a map with no positive mass."""
    up = np.maximum(resize(raw, region.shape), 0.0)
    total = float(up.sum())
    return float(up[region].sum() / total) if total > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# checks


def record(check: str, status: str, value=None, threshold=None, message: str = "", **extra) -> dict:
    return {"check": check, "status": status, "value": value, "threshold": threshold,
            "message": message, **extra}


def check_prediction(flow, expected: int, labels=None) -> dict:
    top = flow.target["top5"][0]
    pred = int(top["index"])

    def name(i):
        lab = labels[i] if labels and 0 <= i < len(labels) else None
        return f"{i} '{lab}'" if lab else f"{i}"
    ok = pred == expected
    p = float(flow.target["probability"]) if flow.target.get("index") == pred else None
    msg = f"predicted {name(pred)}" + (f" (p={p:.3f})" if p is not None else "")
    msg += "" if ok else f", expected {name(expected)}"
    return record("prediction", "pass" if ok else "fail", value=pred, threshold=expected,
                  message=msg, probability=p)


def finals_mass_in_region(flow, region: np.ndarray) -> tuple[float, list[str]]:
    """Share of the final layers' positive mass inside the region: each final map bilinearly
    upsampled (not normalised) to the network input, the finals' masses inside summed over
    their total; so each final map weighs by its share of the total mass (a detector's empty
    scale weighs nothing). One final: ``mass_in_region``. Returns (share, the finals)."""
    finals = [layer.tensor for layer in flow.layers if layer.final] or [flow.final_layer]
    inside = total = 0.0
    for t in finals:
        up = np.maximum(resize(flow.maps[t], region.shape), 0.0)
        inside += float(up[region].sum())
        total += float(up.sum())
    return (inside / total if total > 0 else 0.0), finals


def check_mass(flow, region: np.ndarray, threshold: float) -> dict:
    value, finals = finals_mass_in_region(flow, region)
    ok = value >= threshold
    what = "final layer's" if len(finals) == 1 else f"{len(finals)} final layers'"
    return record("final_mass_in_region", "pass" if ok else "fail", value=round(value, 6),
                  threshold=threshold,
                  message=f"{value:.1%} of the {what} positive mass lies in the region "
                          f"({'>=' if ok else '<'} {threshold:.0%})",
                  region_pixels=int(region.sum()), layer=finals[-1],
                  **({"layers": finals} if len(finals) > 1 else {}))


def check_box(flow, box, threshold: float, min_score: float) -> dict:
    """A detector: the explained box (``flow.target``, image pixels) overlaps the expected
    ``box`` (image pixels) with IoU >= ``threshold`` and scores at least ``min_score``."""
    from ..targets import iou
    t = flow.target
    value = float(iou(np.asarray([t["box"]], float), np.asarray(box, float))[0])
    ok = value >= threshold and t["score"] >= min_score
    name = f"class {t['class']}" + (f" '{t['label']}'" if t.get("label") else "")
    why = (f"IoU {value:.2f} {'>=' if value >= threshold else '<'} {threshold:g}"
           + ("" if t["score"] >= min_score else f"; its score {t['score']:.3f} < {min_score:g}"))
    return record("box_iou", "pass" if ok else "fail", value=round(value, 6), threshold=threshold,
                  message=f"the explained box of {name} {t['box']} (score {t['score']:.2f}) "
                          f"against the expected {list(box)}: {why}",
                  box=t["box"], expected_box=list(box), score=round(float(t["score"]), 6))


def stages_of(layers, stages) -> list[dict]:
    """Stages in forward order: ``"resolution"`` groups layers by their H×W (order of first
    appearance); an integer N cuts the forward order into N near-equal contiguous runs."""
    if stages == "resolution":
        groups: dict[tuple, list] = {}
        for layer in layers:
            groups.setdefault(tuple(layer.shape[2:]), []).append(layer.index)
        return [{"name": f"{h}×{w}", "layers": idx} for (h, w), idx in groups.items()]
    n = max(1, min(int(stages), len(layers)))
    runs = np.array_split(np.arange(len(layers)), n)
    return [{"name": f"stage {k + 1}", "layers": [layers[i].index for i in run]}
            for k, run in enumerate(runs) if len(run)]


STABILITY_MAX_GRID = 8      # the comparison grid has at most this many cells per side


def attention_grid(final_shape) -> tuple[int, int]:
    """The grid the stability distance is computed on: the final layer's H×W, area-reduced so
    that its longer side has at most STABILITY_MAX_GRID cells (aspect kept)."""
    h, w = int(final_shape[0]), int(final_shape[1])
    s = max(h, w) / STABILITY_MAX_GRID
    if s <= 1:
        return h, w
    return max(1, round(h / s)), max(1, round(w / s))


def mass_distribution(m: np.ndarray, grid) -> np.ndarray | None:
    """The positive part of a raw map, area-averaged onto ``grid`` and normalised to sum 1;
    None when the map has no positive mass."""
    g = np.maximum(to_grid(np.maximum(np.asarray(m, np.float32), 0), grid), 0).astype(np.float64)
    total = g.sum()
    return g / total if total > 0 else None


_GRID_GRAPHS: dict = {}


def attention_shift(p: np.ndarray, q: np.ndarray, scale: int = 1_000_000) -> float:
    """Earth mover's distance between two mass distributions on the same H×W grid, with the L1
    ground distance |dx|/W + |dy|/H (cell centres, the image is 1 × 1): the mean distance, in
    image widths/heights, that the attention has to move to turn ``p`` into ``q`` (0 = the same
    place; a point moved across the whole image = 2). Solved exactly as a min-cost flow on the
    4-connected grid (networkx network simplex, masses in units of 1/``scale``)."""
    import networkx as nx
    h, w = p.shape
    a = np.round(p.ravel() * scale).astype(np.int64)
    b = np.round(q.ravel() * scale).astype(np.int64)
    a[np.argmax(a)] += scale - a.sum()
    b[np.argmax(b)] += scale - b.sum()
    base = _GRID_GRAPHS.get((h, w))
    if base is None:
        base = nx.DiGraph()
        base.add_nodes_from(range(h * w))
        for y in range(h):
            for x in range(w):
                k = y * w + x
                if x + 1 < w:   # one column = 1/W of the image; costs scaled by H·W to stay integers
                    base.add_edge(k, k + 1, weight=h)
                    base.add_edge(k + 1, k, weight=h)
                if y + 1 < h:
                    base.add_edge(k, k + w, weight=w)
                    base.add_edge(k + w, k, weight=w)
        _GRID_GRAPHS[(h, w)] = base
    g = base.copy()
    nx.set_node_attributes(g, {k: int(v) for k, v in enumerate(b - a)}, "demand")
    cost = nx.network_simplex(g)[0]
    return float(cost) / (scale * h * w)


def stability_profile(flow, stages="resolution") -> dict:
    """Per layer: the attention shift (``attention_shift``) between the layer's map and the final
    layer's map, both as mass distributions on the final layer's grid (``attention_grid``), and
    the Pearson correlation of the two; per stage: the mean shift over its layers (the final
    layer itself and maps without positive mass left out)."""
    final = flow.final_layer
    grid = attention_grid(flow.maps[final].shape)
    fdist = mass_distribution(flow.maps[final], grid)
    shifts, corrs = [], []
    for layer in flow.layers:
        m = flow.maps[layer.tensor]
        if layer.tensor == final:
            shifts.append(0.0)
            corrs.append(1.0)
            continue
        corrs.append(round(pearson(to_grid(m, flow.maps[final].shape), flow.maps[final]), 6))
        p = mass_distribution(m, grid)
        shifts.append(None if p is None or fdist is None else round(attention_shift(p, fdist), 6))
    by_index = {layer.index: k for k, layer in enumerate(flow.layers)}
    out = []
    for st in stages_of(flow.layers, stages):
        ks = [by_index[i] for i in st["layers"] if flow.layers[by_index[i]].tensor != final]
        vals = [shifts[k] for k in ks if shifts[k] is not None]
        out.append({**st, "mean": round(float(np.mean(vals)), 6) if vals else None,
                    "empty": sum(shifts[k] is None for k in ks), "compared": len(ks)})
    return {"grid": list(grid), "per_layer": shifts, "per_layer_correlation": corrs,
            "stages": out, "final_empty": fdist is None}


def check_stability(flow, threshold: float, stages="resolution") -> dict:
    """Fails when a stage's mean attention shift to the final map exceeds ``threshold`` (image
    sizes), when every layer of a stage has an empty map, or when the final map is empty."""
    prof = stability_profile(flow, stages)
    if prof["final_empty"]:
        return record("flow_stability", "fail", threshold=threshold,
                      message="the final layer's map has no positive mass: nothing to be stable "
                              "towards", **prof)
    scored = [s for s in prof["stages"] if s["compared"]]
    if not scored:
        return record("flow_stability", "skip", threshold=threshold,
                      message="only the final layer is mapped: nothing to compare", **prof)
    empty = [s for s in scored if s["mean"] is None]
    valued = [s for s in scored if s["mean"] is not None]
    bad = [s for s in valued if s["mean"] > threshold] + empty
    worst = max(valued, key=lambda s: s["mean"]) if valued else None
    if worst is not None:
        msg = (f"worst stage {worst['name']}: its attention sits {worst['mean']:.3f} image sizes from "
               f"the final map's on average ({'>' if worst['mean'] > threshold else '<='} {threshold})")
    else:
        msg = "every stage has empty maps"
    if empty:
        msg += f"; stage(s) {', '.join(s['name'] for s in empty)} have no positive attention"
    if bad:
        msg += f"; {len(bad)} of {len(scored)} stages unstable"
    return record("flow_stability", "fail" if bad else "pass",
                  value=worst["mean"] if worst else None, threshold=threshold, message=msg,
                  worst_stage=worst["name"] if worst else None, **prof)


def check_sanity(flow, randomised_flow, threshold: float, randomised: list[str]) -> dict:
    final = flow.final_layer
    a = flow.maps[final]
    b = randomised_flow.maps.get(final)
    rho = spearman(a, b) if b is not None and b.shape == a.shape else 0.0
    ok = rho < threshold
    return record("sanity", "pass" if ok else "fail", value=round(rho, 6), threshold=threshold,
                  message=(f"final-layer map after randomising {len(randomised)} top weight layer(s): "
                           f"Spearman {rho:.3f} to the trained model's ({'<' if ok else '>='} {threshold})"
                           + ("" if ok else ": the maps do not depend on the weights")),
                  randomised=randomised, layer=final)


# ------------------------------------------------------------------------------------------------
# weight randomisation (sanity gate, and the tampered models of the tests and examples)


def randomise_weights(model, count: int = 3, seed: int = 0, skip: int = 0, scale: float = 1.0,
                      additive: bool = False):
    """A copy of ``model`` (ModelProto or path) whose ``count`` top-most weight layers (closest to
    the output, after skipping ``skip`` of them) have their weights redrawn (biases kept):
    ``naflow_onnx.randomise.randomise_onnx``. Returns (copy, names of the layers changed)."""
    from ..randomise import randomise_onnx
    copy, names = randomise_onnx(model, count, seed, include_bias=False, skip=skip, scale=scale,
                                 additive=additive)
    if not names:
        raise NAFlowError("the model has no Conv/Gemm/MatMul layer with constant weights to "
                          "randomise (sanity gate)")
    return copy, names


# ------------------------------------------------------------------------------------------------
# baseline file: an .npz with one float32 map per (image, layer) and a JSON metadata entry


def write_baseline(path, meta: dict, maps: list[list[np.ndarray]]) -> Path:
    """Write atomically: ``meta`` (a uint8 array of UTF-8 JSON) and ``map_IIII_LLLL`` arrays
    (image i of meta["images"], layer l of meta["model"]["layers"]). Byte-identical for identical
    content."""
    from ..io import atomic_file
    path = Path(path)
    with atomic_file(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            def put(key, arr):
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
            blob = json.dumps(meta, indent=1, sort_keys=True, allow_nan=False).encode()
            put("meta", np.frombuffer(blob, np.uint8))
            for i, per_image in enumerate(maps):
                for j, m in enumerate(per_image):
                    put(f"map_{i:04d}_{j:04d}", np.asarray(m, np.float32))
    return path


@dataclass
class Baseline:
    path: Path
    meta: dict
    _npz: object

    @property
    def layers(self) -> list[dict]:
        return self.meta["model"]["layers"]

    def image_index(self, key: str) -> int | None:
        return next((i for i, im in enumerate(self.meta["images"]) if im["key"] == key), None)

    def map(self, image: int, layer: int) -> np.ndarray:
        return self._npz[f"map_{image:04d}_{layer:04d}"]


def read_baseline(path) -> Baseline:
    path = Path(path)
    if not path.is_file():
        raise BaselineError(f"baseline not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(npz["meta"]).decode())
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise BaselineError(f"{path}: not a naflow baseline file ({type(exc).__name__}); record one "
                            "with `naflow baseline MODEL --config ... -o FILE`") from None
    if meta.get("schema") != BASELINE_SCHEMA:
        raise BaselineError(f"{path}: not a naflow baseline file (schema {meta.get('schema')!r})")
    if meta.get("schema_version") != BASELINE_VERSION:
        raise BaselineError(f"{path}: baseline schema_version {meta.get('schema_version')} is not "
                            f"supported (this naflow reads {BASELINE_VERSION}); record it again")
    return Baseline(path, meta, npz)


def is_baseline_file(path) -> bool:
    """a naflow baseline file"""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(bytes(npz["meta"]).decode()).get("schema") == BASELINE_SCHEMA
    except Exception:  # noqa: BLE001 - anything unreadable is not a baseline
        return False


def comparable_preprocess(d: dict) -> dict:
    keys = ("mean", "std", "divisor", "channel_order", "layout", "size", "channels")
    return {k: (list(d[k]) if isinstance(d.get(k), (list, tuple)) else d.get(k)) for k in keys}


def check_settings(baseline: Baseline, settings: dict) -> None:
    """Refuse a baseline recorded with other analysis settings (its maps are not comparable)."""
    old = baseline.meta["analysis"]
    for key in ("method", "target", "damp", "layers"):
        a, b = old.get(key), settings.get(key)
        if a != b:
            raise BaselineError(f"baseline {baseline.path.name} was recorded with {key} = {a!r}, "
                                f"this check uses {b!r}: the maps are not comparable; record the "
                                "baseline again with this configuration")
    a = comparable_preprocess(old["preprocess"])
    b = comparable_preprocess(settings["preprocess"])
    if a != b:
        diff = next(k for k in a if a[k] != b[k])
        raise BaselineError(f"baseline {baseline.path.name} was recorded with preprocessing {diff} = "
                            f"{a[diff]}, this check uses {b[diff]}: the maps are not comparable")


def match_layers(baseline: Baseline, layers, mode: str = "auto", model_sha: str = "") -> dict:
    """Pair the model's layers with the baseline's: by tensor name when all names match (``auto``,
    ``name``), else by depth (index in forward order) when the counts match (``auto``, ``depth``);
    otherwise refused. Paired layers must have the same H×W. Returns {"by", "pairs", ...}."""
    base = baseline.layers
    bmodel = baseline.meta["model"]
    names = [layer.tensor for layer in layers]
    bnames = [b["tensor"] for b in base]
    who = (f"baseline {baseline.path.name} was recorded from model sha256 {bmodel['sha256'][:12]} "
           f"({Path(bmodel.get('path') or '?').name}, {len(base)} layers); this model is sha256 "
           f"{model_sha[:12]} ({len(layers)} layers)")
    by = None
    if mode in ("auto", "name") and set(names) == set(bnames) and len(names) == len(bnames):
        by = "name"
        index = {n: j for j, n in enumerate(bnames)}
        pairs = [(k, index[n]) for k, n in enumerate(names)]
    elif mode == "name":
        common = [n for n in names if n in set(bnames)]
        if not common:
            raise BaselineError(f"{who}: no layer name in common (match = 'name'): refused")
        index = {n: j for j, n in enumerate(bnames)}
        pairs = [(k, index[n]) for k, n in enumerate(names) if n in index]
        by = "name (partial)"
    elif mode in ("auto", "depth") and len(names) == len(bnames):
        by = "depth"
        pairs = [(k, k) for k in range(len(names))]
    else:
        first = next((f"layer {k} is '{a}' here, '{b}' in the baseline"
                      for k, (a, b) in enumerate(zip(names, bnames)) if a != b), None)
        why = (f"the layer names differ ({first}) and " if first else "the layer names differ and ")
        if mode == "depth":
            why = ""
        raise BaselineError(f"{who}: {why}the layer counts differ ({len(bnames)} vs {len(names)}), "
                            "so layers can be matched neither by name nor by depth: refused "
                            "(a baseline from another model?)")
    for k, j in pairs:
        hw, bhw = list(layers[k].shape[2:]), list(base[j]["shape"][2:])
        if hw != bhw:
            raise BaselineError(f"{who}: layers matched by {by} differ in size: layer {k} "
                                f"'{names[k]}' is {hw[0]}×{hw[1]} here and {bhw[0]}×{bhw[1]} in the "
                                "baseline: refused")
    return {"by": by, "pairs": pairs,
            "same_model": bmodel["sha256"] == model_sha, "baseline_model_sha256": bmodel["sha256"]}


def layer_threshold(tensor: str, default: float, overrides: dict[str, float]) -> float:
    if tensor in overrides:
        return overrides[tensor]
    for pattern, value in overrides.items():
        if re.search(pattern, tensor):
            return value
    return default


def check_baseline(flow, baseline: Baseline, matching: dict, image_key: str, image_sha: str,
                   default: float, overrides: dict[str, float]) -> dict:
    """Per layer: Pearson correlation of the raw map with the baseline's map of the same image at
    the paired layer; fails when any layer is below its threshold. The first such layer in
    forward order is where the flow diverges."""
    i = baseline.image_index(image_key)
    if i is None:
        return record("baseline_correlation", "fail", threshold=default,
                      message=f"image '{image_key}' is not in baseline {baseline.path.name}: record "
                              "the baseline again after adding images")
    entry = baseline.meta["images"][i]
    if entry.get("sha256") and entry["sha256"] != image_sha:
        return record("baseline_correlation", "fail", threshold=default,
                      message=f"image '{image_key}' has changed since baseline "
                              f"{baseline.path.name} was recorded (sha256 differs)")
    per_layer = []
    for k, j in matching["pairs"]:
        layer = flow.layers[k]
        thr = layer_threshold(layer.tensor, default, overrides)
        r = pearson(flow.maps[layer.tensor], baseline.map(i, j))
        per_layer.append({"index": layer.index, "tensor": layer.tensor, "op_type": layer.op_type,
                          "baseline_tensor": baseline.layers[j]["tensor"], "baseline_index": j,
                          "r": round(r, 6), "threshold": thr, "ok": r >= thr})
    bad = [p for p in per_layer if not p["ok"]]
    worst = min(per_layer, key=lambda p: p["r"])
    target_note = ""
    if entry.get("target") is not None and entry["target"] != flow.target.get("index"):
        target_note = (f"; the baseline explained class {entry['target']}, this run class "
                       f"{flow.target.get('index')}")
    if bad:
        d = bad[0]
        msg = (f"{len(bad)} of {len(per_layer)} layers below threshold; the flow diverges from the "
               f"baseline at layer {d['index']} ({d['op_type']} '{d['tensor']}'): r = {d['r']:.3f} < "
               f"{d['threshold']}; lowest r = {worst['r']:.3f} at layer {worst['index']}")
    else:
        msg = (f"all {len(per_layer)} layers correlate >= threshold with the baseline "
               f"(lowest r = {worst['r']:.3f} at layer {worst['index']}; matched by {matching['by']})")
    return record("baseline_correlation", "fail" if bad else "pass", value=worst["r"],
                  threshold=default, message=msg + target_note, matched_by=matching["by"],
                  diverges_at=bad[0]["index"] if bad else None, layers_below=len(bad),
                  per_layer=per_layer)
