"""MaxPool (Eq. 14): BPFM_out goes back to the positions the forward pass selected."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rebuild.pooling import max_pool_padded
from . import InverseRule
from .solver import SolveRecord


def scatter_selected(x: torch.Tensor, xp: torch.Tensor, indices: torch.Tensor, y: torch.Tensor,
                     pads: list[int]) -> torch.Tensor:
    """Place y at the selected input positions; where windows overlap and several outputs select
    one input, their values are averaged (deterministic). Unselected positions get 0."""
    n, c = y.shape[:2]
    flat = indices.reshape(n, c, -1)
    total = torch.zeros(n, c, xp.shape[2] * xp.shape[3], dtype=y.dtype, device=y.device)
    count = torch.zeros_like(total)
    total.scatter_add_(2, flat, y.reshape(n, c, -1))
    count.scatter_add_(2, flat, torch.ones_like(y).reshape(n, c, -1))
    out = torch.where(count > 0, total / count.clamp(min=1), total).reshape(xp.shape)
    nd = 2
    return out[:, :, pads[0]:xp.shape[2] - pads[0 + nd], pads[1]:xp.shape[3] - pads[1 + nd]]


class MaxPoolRule(InverseRule):
    summary = "selection (Eq. 14): BPFM_out back to the positions the forward pass selected"

    def invert(self, ctx):
        node = ctx.node
        name = node.inputs[0]
        x = ctx.env[name]
        y = ctx.bpfm_out[ctx.output()]
        if node.op_type == "GlobalMaxPool":
            xp, kernel, strides, dil, pads = x, list(x.shape[2:]), [1, 1], [1, 1], [0, 0, 0, 0]
        else:
            xp, kernel, strides, dil, pads = max_pool_padded(node, x)
        _, idx = F.max_pool2d(xp, kernel, strides, 0, dil, return_indices=True)
        return {name: scatter_selected(x, xp, idx, y, pads)}, SolveRecord(kind="exact")
