"""The torch forward of a rebuilt graph, whole or in part."""
from __future__ import annotations

import numpy as np
import torch

from .errors import ParityError
from .graph import ModelGraph


def run_nodes(mg: ModelGraph, env: dict[str, torch.Tensor], node_ids) -> dict[str, torch.Tensor]:
    """Run the given nodes (forward order) reading inputs from ``env``; adds their outputs."""
    for i in node_ids:
        node = mg.nodes[i]
        args = [env[t] if t else None for t in node.inputs]
        for name, value in zip(node.outputs, node.run(args)):
            if name:
                env[name] = value
    return env


def run_graph(mg: ModelGraph, x: torch.Tensor, device: torch.device | str = "cpu",
              track: bool = False, constants: dict[str, torch.Tensor] | None = None
              ) -> dict[str, torch.Tensor]:
    """All tensors of the graph for input ``x``. With ``track`` every float tensor keeps its grad.
    ``constants`` may hold the initializers already on ``device`` (moved once per model)."""
    env = dict(constants) if constants is not None else {k: v.to(device) for k, v in mg.constants.items()}
    x = x.to(device)
    if track:
        x = x.detach().requires_grad_(True)
    env[mg.input_name] = x
    for node in mg.nodes:
        run_nodes(mg, env, [node.index])
        if track:
            for name in node.outputs:
                v = env.get(name)
                if v is not None and v.requires_grad:
                    v.retain_grad()
    return env


def parity(values: dict[str, torch.Tensor], captured: dict[str, np.ndarray],
           tolerance: float) -> dict:
    """Relative error of every float tensor, torch rebuild against onnxruntime.

    Relative error = ||torch - ort|| / max(||ort||, 1e-6 * sqrt(numel)). Over tolerance raises.
    """
    return image_parity(values, captured, tolerance, 1)[0]


def image_parity(values: dict[str, torch.Tensor], captured: dict[str, np.ndarray],
                 tolerance: float, images: int) -> list[dict]:
    """``parity`` of each image of a batch (dim 0 of every tensor whose dim 0 is the batch; a
    tensor without one counts whole for every image)."""
    worst = [0.0] * images
    worst_name: list[str | None] = [None] * images
    checked = 0
    per_tensor: list[dict] = [{} for _ in range(images)]
    for name, ref in captured.items():
        t = values.get(name)
        if t is None or not np.issubdtype(ref.dtype, np.floating) or ref.size == 0:
            continue   # an empty tensor (Paddle's exports hold some) has nothing to compare
        a = t.detach().float().cpu().numpy()
        if a.shape != ref.shape:
            raise ParityError(f"tensor '{name}': torch rebuild shape {a.shape} != onnxruntime "
                              f"{ref.shape}")
        if not np.all(np.isfinite(ref)):
            raise ParityError(f"tensor '{name}': the model produces NaN/Inf on this input")
        rows = images if images > 1 and ref.ndim and ref.shape[0] == images else 1
        r, d = ref.reshape(rows, -1), (a - ref).reshape(rows, -1)
        denom = np.maximum(np.linalg.norm(r, axis=1), 1e-6 * np.sqrt(r.shape[1]))
        errs = np.linalg.norm(d, axis=1) / denom
        checked += 1
        for b in range(images):
            err = float(errs[b if rows > 1 else 0])
            per_tensor[b][name] = err
            if err > worst[b]:
                worst[b], worst_name[b] = err, name
    out = []
    for b in range(images):
        if worst[b] > tolerance:
            raise ParityError(f"torch rebuild differs from onnxruntime at tensor '{worst_name[b]}': "
                              f"relative error {worst[b]:.3g} > tolerance {tolerance:.3g}"
                              + (f" (image {b + 1} of the batch)" if images > 1 else ""))
        out.append({"max_relative_error": worst[b], "worst_tensor": worst_name[b],
                    "tensors_checked": checked, "tolerance": tolerance,
                    "per_tensor": per_tensor[b]})
    return out
