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
    worst, worst_name, checked = 0.0, None, 0
    per_tensor = {}
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
        denom = max(float(np.linalg.norm(ref)), 1e-6 * np.sqrt(ref.size))
        err = float(np.linalg.norm(a - ref)) / denom
        per_tensor[name] = err
        checked += 1
        if err > worst:
            worst, worst_name = err, name
    record = {"max_relative_error": worst, "worst_tensor": worst_name, "tensors_checked": checked,
              "tolerance": tolerance}
    if worst > tolerance:
        raise ParityError(f"torch rebuild differs from onnxruntime at tensor '{worst_name}': "
                          f"relative error {worst:.3g} > tolerance {tolerance:.3g}")
    record["per_tensor"] = per_tensor
    return record
