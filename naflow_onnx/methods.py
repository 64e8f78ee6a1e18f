"""How Lambda, A and BPFM become a map at one layer (paper Eq. 2 and the comparison methods).

Every method returns a raw map [N, H, W] (float32, not normalised); display normalisation is
min-max (``normalise``) and happens only when drawing (``resize_normalised``). ``resize`` is the
one bilinear resize of a map (check and evaluate use it too).
"""
from __future__ import annotations

import numpy as np

METHODS = ("naflow", "reference", "gradcam", "layercam", "gradxact")
NEEDS_BPFM = {"naflow"}


def layer_map(method: str, A: "torch.Tensor", lam: "torch.Tensor",  # noqa: F821
              bpfm: "torch.Tensor | None" = None) -> "torch.Tensor":  # noqa: F821
    import torch
    if method == "naflow":            # L = ReLU(sum_d Lambda_d BPFM_d)          (Eq. 2)
        return torch.relu((lam * bpfm).sum(1))
    if method == "reference":         # released code: sum_d ReLU(Lambda_d A_d [Lambda_d != 0])
        return torch.relu(lam * torch.where(lam != 0, A, torch.zeros_like(A))).sum(1)
    if method == "gradcam":           # ReLU(sum_d mean_hw(Lambda_d) A_d)
        return torch.relu((lam.mean(dim=(2, 3), keepdim=True) * A).sum(1))
    if method == "layercam":          # ReLU(sum_d ReLU(Lambda_d) A_d)
        return torch.relu((torch.relu(lam) * A).sum(1))
    if method == "gradxact":          # ReLU(sum_d Lambda_d A_d)
        return torch.relu((lam * A).sum(1))
    raise ValueError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def normalise(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 0:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def _resize_axis_weights(n_in: int, n_out: int):
    """Indices and weights of 1-D linear interpolation with half-pixel centres."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    return i0, i1, w1


def resize(m, shape) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``shape = (H, W)`` (half-pixel centres: torch's
    ``interpolate(mode="bilinear", align_corners=False)``), not normalised. A copy when the
    shape already matches. Returns float64. The one resize of the project (flow, check,
    evaluate)."""
    a = np.asarray(m, np.float64)
    H, W = int(shape[0]), int(shape[1])
    if a.shape == (H, W):
        return a.copy()
    r0, r1, rw = _resize_axis_weights(a.shape[0], H)
    c0, c1, cw = _resize_axis_weights(a.shape[1], W)
    rows = a[r0] * (1 - rw)[:, None] + a[r1] * rw[:, None]
    return rows[:, c0] * (1 - cw)[None, :] + rows[:, c1] * cw[None, :]


def resize_normalised(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``resize`` to (height, width), then min-max normalised to [0, 1] (display, float32)."""
    return normalise(resize(m, size))
