"""Activations and element-wise arithmetic (numpy-style broadcasting, as ONNX)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import scalar


SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875  # ONNX defaults


def binary(fn):
    """The op function of a two-input torch function (``torch.add``, ...)."""
    return lambda node, inputs: fn(inputs[0], inputs[1])


def div(node, inputs):
    a, b = inputs
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def unary(fn):
    """The op function of a one-input torch function (``torch.relu``, ...)."""
    return lambda node, inputs: fn(inputs[0])


def identity(node, inputs):
    out = [inputs[0]]
    if len(node.outputs) > 1:  # Dropout's optional mask output
        out.append(torch.ones_like(inputs[0], dtype=torch.bool))
    return out


def clip(node, inputs):
    x = inputs[0]
    if node.opset < 11:
        lo, hi = node.attr("min"), node.attr("max")
    else:
        lo = scalar(inputs[1]) if len(inputs) > 1 else None
        hi = scalar(inputs[2]) if len(inputs) > 2 else None
    if lo is not None and hi is not None and x.is_floating_point() and lo <= hi:
        # both bounds: what ReLU6/hardtanh export to. Its gradient is PyTorch's hardtanh's,
        # strictly inside (min, max) (clamp would pass it at the bounds too): METHOD.md §4
        return F.hardtanh(x, float(lo), float(hi))
    return torch.clamp(x, lo, hi)


def leaky_relu(node, inputs):
    return F.leaky_relu(inputs[0], float(node.attr("alpha", 0.01)))


def elu(node, inputs):
    return F.elu(inputs[0], float(node.attr("alpha", 1.0)))


def selu(node, inputs):
    x = inputs[0]
    alpha, gamma = float(node.attr("alpha", SELU_ALPHA)), float(node.attr("gamma", SELU_GAMMA))
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def prelu(node, inputs):
    x, slope = inputs
    if slope.dim() == 1 and x.dim() > 2 and slope.numel() == x.shape[1]:
        slope = slope.reshape([1, -1] + [1] * (x.dim() - 2))
    return torch.where(x >= 0, x, x * slope)


def hard_sigmoid(node, inputs):
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return torch.clamp(alpha * inputs[0] + beta, 0.0, 1.0)


def variadic(node, inputs):
    out = inputs[0]
    for t in inputs[1:]:
        if node.op_type == "Max":
            out = torch.maximum(out, t)
        elif node.op_type == "Min":
            out = torch.minimum(out, t)
        else:
            out = out + t
    return out / len(inputs) if node.op_type == "Mean" else out


def where(node, inputs):
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])


def _softmax_like(fn):
    def run(node, inputs):
        x = inputs[0]
        if node.opset < 13:  # older opsets flatten to 2-D at `axis` (default 1)
            axis = int(node.attr("axis", 1)) % x.dim()
            flat = x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1)
            return fn(flat, dim=1).reshape(x.shape)
        return fn(x, dim=int(node.attr("axis", -1)))
    return run


softmax = _softmax_like(torch.softmax)
log_softmax = _softmax_like(torch.log_softmax)


def lp_normalization(node, inputs):
    return F.normalize(inputs[0], p=float(node.attr("p", 2)), dim=int(node.attr("axis", -1)))
