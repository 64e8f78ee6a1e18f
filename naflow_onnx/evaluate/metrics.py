"""Faithfulness and localisation metrics for attention maps (numpy; engine-independent).

Conventions: a *map* is a finite float array ``[h, w]``; a *mask* is a bool array ``[H, W]``;
an *image* is ``[H, W, 3]`` uint8 (or float in the same 0..255 range). Maps at a feature
tensor's resolution are resized to the image with :func:`resize_map` (bilinear, half-pixel
centres: the same as ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``) wherever a metric needs image resolution.

Localisation (ground truth = the object's pixel mask or box):

* :func:`energy_in_mask` - share of the positive map mass inside the mask.
* :func:`pointing_game`  - is the maximum inside the mask (ties shared, see there).

Faithfulness (the model decides; Petsiuk et al. 2018, "RISE"):

* :func:`deletion_auc`   - remove the most important pixels first; lower is better.
* :func:`insertion_auc`  - restore the most important pixels first into a blurred image;
  higher is better.

Sanity (Adebayo et al. 2018, "Sanity checks for saliency maps"):

* :func:`spearman` / :func:`randomisation_test` - rank correlation between the map of the
  trained model and the maps of models whose weights are randomised top-down, cumulatively;
* :func:`randomise_onnx` / :func:`cascading_randomisation_onnx` / :func:`randomise_torch`
  make those models.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np

from ..methods import resize
from ..randomise import constant_value, randomise_onnx, weight_bearing_nodes  # noqa: F401 (API)

__all__ = ["resize_map", "energy_in_mask", "pointing_game", "deletion_auc", "insertion_auc",
           "deletion_insertion_curve", "gaussian_blur", "box_to_mask", "spearman",
           "randomisation_test", "weight_bearing_nodes", "constant_value", "randomise_onnx",
           "cascading_randomisation_onnx", "randomise_torch", "onnx_prob_fn"]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def _as_map(m) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"a map must be 2-D (h, w); got shape {np.shape(m)}")
    if not np.all(np.isfinite(a)):
        raise ValueError("map contains NaN or inf")
    return a


def _as_mask(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W); got shape {m.shape}")
    return m.astype(bool)


def resize_map(m, shape: Sequence[int]) -> np.ndarray:
    """A checked 2-D map resized bilinearly to ``shape = (H, W)`` (``naflow_onnx.methods.resize``:
    half-pixel centres, not normalised, float64)."""
    return resize(_as_map(m), shape)


def _map_for(m, mask: np.ndarray) -> np.ndarray:
    a = _as_map(m)
    return a if a.shape == mask.shape else resize_map(a, mask.shape)


def box_to_mask(box: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Bool mask ``[H, W]`` of a box ``[x0, y0, x1, y1]`` (pixel edges, x1/y1 exclusive)."""
    H, W = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = box
    m = np.zeros((H, W), bool)
    m[max(int(round(y0)), 0):min(int(round(y1)), H), max(int(round(x0)), 0):min(int(round(x1)), W)] = True
    return m


# ---------------------------------------------------------------------------------------
# localisation
# ---------------------------------------------------------------------------------------

def energy_in_mask(m, mask) -> float:
    """Share of the positive map mass that lies inside the mask, in [0, 1].

    ``sum(max(map, 0)[mask]) / sum(max(map, 0))``. The map is resized to the mask's shape
    if needed. A map with no positive mass (all zero or all negative) carries no
    localisation information and returns ``nan`` (aggregate with ``np.nanmean`` and report
    the count of such maps). An empty mask returns 0 for a non-zero map.
    (This is the "energy-based pointing game" of Score-CAM, Wang et al. 2020.)
    """
    mask = _as_mask(mask)
    a = np.clip(_map_for(m, mask), 0, None)
    total = a.sum()
    if not total > 0:
        return float("nan")
    return float(a[mask].sum() / total)


def pointing_game(m, mask, tolerance: float = 0.0) -> float:
    """Hit (1.0) if the map's maximum lies inside the mask, else miss (0.0).

    Ties: when several pixels share the maximum value (exact equality), the result is the
    share of them that lie inside the mask, i.e. the expected hit rate when the tie is broken
    uniformly at random. So a constant map scores the mask's area fraction instead of a
    free hit. ``tolerance`` (pixels, default 0) dilates the mask by a disc of that radius,
    as in Zhang et al. 2016 (who use 15 px at 224); 0 means the strict test.
    The map is resized to the mask's shape if needed. An empty mask scores 0.
    """
    mask = _as_mask(mask)
    if tolerance > 0:
        from scipy.ndimage import binary_dilation

        r = int(np.ceil(tolerance))
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        mask = binary_dilation(mask, structure=(xx * xx + yy * yy) <= tolerance * tolerance)
    a = _map_for(m, mask)
    top = a == a.max()
    return float(mask[top].sum() / top.sum())


# ---------------------------------------------------------------------------------------
# deletion / insertion (RISE)
# ---------------------------------------------------------------------------------------

def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Per-channel Gaussian blur (float64 result, 'reflect' borders)."""
    from scipy.ndimage import gaussian_filter

    img = np.asarray(image, dtype=np.float64)
    return gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect")


def _substrate(image: np.ndarray, kind, blur_sigma: float | None) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    H, W = img.shape[:2]
    if isinstance(kind, str):
        if kind == "zero":
            return np.zeros_like(img)
        if kind == "mean":
            return np.broadcast_to(img.reshape(-1, img.shape[-1]).mean(0), img.shape).copy()
        if kind == "blur":
            sigma = max(H, W) / 24.0 if blur_sigma is None else float(blur_sigma)
            return gaussian_blur(img, sigma)
        raise ValueError(f"unknown baseline {kind!r}: use 'zero', 'mean', 'blur' or an array/colour")
    return np.broadcast_to(np.asarray(kind, dtype=np.float64), img.shape).copy()


def _order(m, shape, seed: int) -> np.ndarray:
    """Pixel indices in decreasing map value; ties broken by a seeded random permutation."""
    a = resize_map(m, shape).ravel()
    tie = np.random.default_rng(seed).permutation(a.size)
    return np.lexsort((tie, -a))


def deletion_insertion_curve(prob_fn: Callable[[np.ndarray], np.ndarray], image, m, mode: str,
                             steps: int = 100, baseline="mean", blur_sigma: float | None = None,
                             batch_size: int = 32, seed: int = 0):
    """The RISE curve: ``(fractions [steps+1], probs [steps+1])``.

    ``mode="deletion"``: start from ``image``; at step k the ``ceil(k * HW / steps)`` most
    important pixels (all channels) are replaced by ``baseline``.
    ``mode="insertion"``: start from ``baseline`` and restore the most important pixels of
    ``image`` in the same way. Baselines: ``"mean"`` (per-channel mean colour of the image;
    the analogue of RISE's zeros in mean-subtracted input space), ``"zero"`` (black),
    ``"blur"`` (Gaussian blur, sigma ``blur_sigma`` px, default max(H, W)/24 = 4 px at 96),
    or an explicit array / colour. Images passed to ``prob_fn`` have the dtype of ``image``
    (uint8 images are rounded), shape ``[B, H, W, 3]``, B <= batch_size; ``prob_fn`` returns
    the target-class probabilities ``[B]``. The map is resized to the image; pixel order is
    by decreasing map value, ties in a seeded random order (so constant regions get no
    privileged scan order).
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"image must be [H, W, C]; got {img.shape}")
    H, W, C = img.shape
    n = H * W
    if mode not in ("deletion", "insertion"):
        raise ValueError(mode)
    sub = _substrate(img, baseline, blur_sigma)
    if img.dtype == np.uint8:   # every perturbed pixel is one of the two: round once
        src = img.reshape(n, C)
        sub = np.clip(np.rint(sub), 0, 255).astype(np.uint8).reshape(n, C)
    else:
        src = img.astype(np.float64).reshape(n, C)
        sub = sub.reshape(n, C)
    start, end = (src, sub) if mode == "deletion" else (sub, src)
    order = _order(m, (H, W), seed)
    counts = np.ceil(np.arange(steps + 1) * n / steps).astype(int)
    rank = np.empty(n, int)
    rank[order] = np.arange(n)  # position of each pixel in the order
    probs = np.empty(steps + 1, np.float64)
    for b0 in range(0, steps + 1, batch_size):
        ks = counts[b0:b0 + batch_size]
        changed = rank[None, :] < ks[:, None]                      # [B, n]
        batch = np.where(changed[..., None], end[None], start[None]).reshape(len(ks), H, W, C)
        if img.dtype != np.uint8:
            batch = batch.astype(img.dtype, copy=False)
        p = np.asarray(prob_fn(batch), dtype=np.float64).reshape(-1)
        if p.shape[0] != len(ks):
            raise ValueError(f"prob_fn returned {p.shape[0]} values for a batch of {len(ks)}")
        probs[b0:b0 + len(ks)] = p
    return counts / n, probs


def _auc(fractions: np.ndarray, probs: np.ndarray) -> float:
    """Trapezoid rule over the changed-pixel fractions 0..1 (an x range of 1, so no further
    normalisation). Equals RISE's ``(sum(p) - p[0]/2 - p[-1]/2) / steps`` when steps divides
    the pixel count, and differs by the rounding of the step sizes otherwise."""
    return float(np.sum((probs[1:] + probs[:-1]) * np.diff(fractions)) / 2)


def deletion_auc(prob_fn, image, m, steps: int = 100, baseline="mean", blur_sigma: float | None = None,
                 batch_size: int = 32, seed: int = 0, return_curve: bool = False):
    """Deletion AUC (RISE), in [0, 1] for probabilities; lower = more faithful.

    See :func:`deletion_insertion_curve`. The area is taken over the fraction of deleted
    pixels (trapezoid rule; steps equal in pixel count up to rounding). With
    ``return_curve`` returns ``(auc, fractions, probs)``.
    """
    f, p = deletion_insertion_curve(prob_fn, image, m, "deletion", steps, baseline, blur_sigma,
                                    batch_size, seed)
    return (_auc(f, p), f, p) if return_curve else _auc(f, p)


def insertion_auc(prob_fn, image, m, steps: int = 100, baseline="blur", blur_sigma: float | None = None,
                  batch_size: int = 32, seed: int = 0, return_curve: bool = False):
    """Insertion AUC (RISE), in [0, 1] for probabilities; higher = more faithful.

    Starts from the blurred image (default) and restores the original pixels in decreasing
    map order. See :func:`deletion_insertion_curve`.
    """
    f, p = deletion_insertion_curve(prob_fn, image, m, "insertion", steps, baseline, blur_sigma,
                                    batch_size, seed)
    return (_auc(f, p), f, p) if return_curve else _auc(f, p)


def onnx_prob_fn(model, target: int, preprocess: dict | None = None, providers=None,
                 softmax: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """A ``prob_fn`` for the metrics above, running an ONNX classifier in onnxruntime.

    ``model``: path, bytes or onnx.ModelProto with one NCHW image input and logits output.
    ``preprocess``: ``{"mean", "std", "scale", "size"}`` (default: the model's
    ``naflow.preprocess`` metadata; else scale 255, mean 0, std 1). Images are resized to
    ``size`` (bilinear, Pillow) when they differ. A static batch dimension of 1 is handled by
    looping. ``softmax=False`` returns the raw logit of ``target`` instead.
    """
    import json

    import onnx
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        proto = onnx.load_from_string(bytes(model))
    else:
        proto = onnx.load(str(model))
    if preprocess is None:
        meta = {p.key: p.value for p in proto.metadata_props}
        preprocess = json.loads(meta["naflow.preprocess"]) if "naflow.preprocess" in meta else {}
    scale = float(preprocess.get("scale", 255))
    mean = np.asarray(preprocess.get("mean", [0.0, 0.0, 0.0]), np.float32)
    std = np.asarray(preprocess.get("std", [1.0, 1.0, 1.0]), np.float32)
    size = preprocess.get("size")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=providers or ["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    static_one = isinstance(inp.shape[0], int) and inp.shape[0] == 1

    def fn(images: np.ndarray) -> np.ndarray:
        imgs = np.asarray(images)
        if size is not None and imgs.shape[1:3] != (size, size):
            from PIL import Image

            imgs = np.stack([np.asarray(Image.fromarray(np.clip(i, 0, 255).astype(np.uint8)).resize(
                (size, size), Image.BILINEAR)) for i in imgs])
        x = ((imgs.astype(np.float32) / scale - mean) / std).transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if static_one:
            logits = np.concatenate([sess.run(None, {inp.name: x[i:i + 1]})[0] for i in range(len(x))])
        else:
            logits = sess.run(None, {inp.name: x})[0]
        logits = logits.reshape(len(x), -1).astype(np.float64)
        if not softmax:
            return logits[:, target]
        z = logits - logits.max(1, keepdims=True)
        e = np.exp(z)
        return e[:, target] / e.sum(1)

    return fn


# ---------------------------------------------------------------------------------------
# sanity: rank correlation and cascading randomisation
# ---------------------------------------------------------------------------------------

def spearman(a, b, absolute: bool = False) -> float:
    """Spearman rank correlation of two maps (flattened; resized to a common shape).

    If the shapes differ, the smaller map is resized (bilinear) to the larger one. With
    ``absolute`` the absolute values are ranked (Adebayo et al. report both). Ties get
    average ranks. A constant map has no ranking: ``nan`` (``naflow_onnx.stats``).
    """
    from ..stats import spearman as rank_correlation

    x, y = _as_map(a), _as_map(b)
    if x.shape != y.shape:
        if x.size >= y.size:
            y = resize_map(y, x.shape)
        else:
            x = resize_map(x, y.shape)
    if absolute:
        x, y = np.abs(x), np.abs(y)
    return rank_correlation(x, y)


def randomisation_test(original, randomised: Sequence, absolute: bool = False) -> list[float]:
    """Spearman correlation of ``original`` with each map in ``randomised`` (in order).

    Typical use (Adebayo et al. 2018): ``randomised[k-1]`` is the map of the same image and
    class from the model with its last ``k`` weight-bearing layers randomised
    (:func:`cascading_randomisation_onnx`). A method that passes the sanity check shows
    correlations that drop well below 1 as k grows; a map that stays ~1 does not depend on
    the learned weights.
    """
    return [spearman(original, r, absolute) for r in randomised]


def cascading_randomisation_onnx(model, seed: int = 0, max_k: int | None = None,
                                 include_bias: bool = True):
    """``[(k, node_name, model_k)]`` for k = 1..K: the cascade, top layer first."""
    nodes = weight_bearing_nodes(model)
    K = len(nodes) if max_k is None else min(max_k, len(nodes))
    res = []
    for k in range(1, K + 1):
        m, names = randomise_onnx(model, k, seed, include_bias)
        res.append((k, names[-1], m))
    return res


def randomise_torch(model, k: int, seed: int = 0, example_input=None, include_bias: bool = True):
    """A deep copy of a torch model with its last ``k`` Conv/Linear modules randomised.

    Order: execution order of a forward pass on ``example_input`` when given (forward hooks;
    a module called twice counts at its first call), else module registration order - for
    the nets in this package the two coincide. Each weight (and bias) becomes
    ``normal(0, std(original))`` from ``torch.Generator().manual_seed(seed * 1_000_003 + position)``.
    Returns ``(model_copy, [qualified module names randomised])``.
    """
    import torch

    m = copy.deepcopy(model)
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    named = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, kinds)]
    if example_input is not None:
        calls: list[str] = []
        hooks = [mod.register_forward_hook(lambda mod_, i_, o_, n=n: calls.append(n) if n not in calls else None)
                 for n, mod in named]
        was_training = m.training
        m.eval()
        with torch.no_grad():
            m(example_input)
        m.train(was_training)
        for h in hooks:
            h.remove()
        lookup = dict(named)
        named = [(n, lookup[n]) for n in calls]
    position = {n: i for i, (n, _) in enumerate(named)}
    chosen = named[::-1][:max(int(k), 0)]
    with torch.no_grad():
        for n, mod in chosen:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + position[n])
            params = [mod.weight] + ([mod.bias] if include_bias and mod.bias is not None else [])
            for p in params:
                std = float(p.detach().double().std()) if p.numel() > 1 else 0.0
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return m, [n for n, _ in chosen]
