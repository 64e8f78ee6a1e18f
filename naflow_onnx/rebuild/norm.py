"""Normalisation layers: LayerNormalization (any axis), GroupNormalization (opset 18 per-group and
opset 21 per-channel scale), InstanceNormalization.

Each is ``y = (x - mean) / std * gamma + beta`` with statistics over a group of elements;
``norm_terms`` gives the four terms broadcast to x's shape, so that the rebuild and the inverse
rule (``rules/norm.py``: the statistics frozen at the forward point, METHOD.md §4) share one
definition.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedOpError

NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")


def _per_channel(t: torch.Tensor | None, x: torch.Tensor, fill: float) -> torch.Tensor:
    if t is None:
        return torch.full((1,) * x.dim(), fill, dtype=x.dtype, device=x.device)
    return t.reshape([1, -1] + [1] * (x.dim() - 2)).to(x.dtype)


def norm_terms(node, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, gamma, beta) of a normalisation node, each broadcastable to its input x."""
    x = inputs[0]
    scale = inputs[1] if len(inputs) > 1 else None
    bias = inputs[2] if len(inputs) > 2 else None
    eps = float(node.attr("epsilon", 1e-5))
    op = node.op_type
    if op == "LayerNormalization":
        axis = int(node.attr("axis", -1)) % x.dim()
        dims = tuple(range(axis, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        gamma = scale.to(x.dtype) if scale is not None else torch.ones((), dtype=x.dtype)
        beta = bias.to(x.dtype) if bias is not None else torch.zeros((), dtype=x.dtype)
        return mean, torch.sqrt(var + eps), gamma, beta
    if op == "InstanceNormalization":
        dims = tuple(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        return mean, torch.sqrt(var + eps), _per_channel(scale, x, 1.0), _per_channel(bias, x, 0.0)
    if op == "GroupNormalization":
        groups = int(node.attr("num_groups"))
        n, c = x.shape[:2]
        if c % groups:
            raise UnsupportedOpError(f"{node.where()}: {c} channels do not split into {groups} groups")
        g = x.reshape(n, groups, -1)
        mean = g.mean(dim=2, keepdim=True)
        var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
        std = torch.sqrt(var + eps)
        full = [n, groups, c // groups] + [1] * (x.dim() - 2)
        mean = mean.reshape(n, groups, 1, *([1] * (x.dim() - 2))).expand(full).reshape(n, c, *full[3:])
        std = std.reshape(n, groups, 1, *([1] * (x.dim() - 2))).expand(full).reshape(n, c, *full[3:])

        def per_channel(t, fill):
            # opset 18 writes one scale per group, opset 21 one per channel
            if t is not None and t.numel() == groups and groups != c:
                t = t.repeat_interleave(c // groups)
            return _per_channel(t, x, fill)
        return mean, std, per_channel(scale, 1.0), per_channel(bias, 0.0)
    raise UnsupportedOpError(f"{node.where()}: not a normalisation op")


def normalization(node, inputs):
    mean, std, gamma, beta = norm_terms(node, inputs)
    y = (inputs[0] - mean) / std * gamma + beta
    if node.op_type == "LayerNormalization" and len(node.outputs) > 1:
        return [y, mean, 1.0 / std]    # the optional Mean and InvStdDev outputs
    return y
