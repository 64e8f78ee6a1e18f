"""How Lambda, A and BPFM become a map at one layer (paper Eq. 2 and the comparison methods).

Every method returns a raw map [N, H, W] (float32, not normalised); display normalisation is
min-max (``normalise``) and happens only when drawing or resizing.
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


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an H×W map to (height, width), then min-max normalised."""
    import torch
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    up = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return normalise(up[0, 0].numpy())
