"""Conv, ConvTranspose, Gemm, MatMul, BatchNormalization."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOpError


def spatial_pads(node, x: torch.Tensor, kernel: list[int], strides: list[int],
                 dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for a window op, honouring auto_pad."""
    nd = len(kernel)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = list(node.attr("pads", [0] * (2 * nd)))
        return pads if pads else [0] * (2 * nd)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else big)
            ends.append(big if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    raise UnsupportedOpError(f"unsupported auto_pad '{auto_pad}' at {node.where()}")


def torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] -> torch F.pad order (last dim first)."""
    nd = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[i + nd]]
    return out


def _conv_fn(nd: int, transpose: bool = False):
    name = f"conv_transpose{nd}d" if transpose else f"conv{nd}d"
    return getattr(F, name, None)


def conv(node, inputs):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nd = x.dim() - 2
    fn = _conv_fn(nd)
    if fn is None:
        raise UnsupportedOpError(f"Conv with {nd} spatial dims at {node.where()}")
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    pads = spatial_pads(node, x, kernel, strides, dil)
    groups = int(node.attr("group", 1))
    if pads[:nd] == pads[nd:]:
        return fn(x, w, b, strides, pads[:nd], dil, groups)
    return fn(F.pad(x, torch_pad(pads)), w, b, strides, 0, dil, groups)


def conv_transpose(node, inputs):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nd = x.dim() - 2
    fn = _conv_fn(nd, transpose=True)
    if fn is None:
        raise UnsupportedOpError(f"ConvTranspose with {nd} spatial dims at {node.where()}")
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    groups = int(node.attr("group", 1))
    out_pad = list(node.attr("output_padding", [0] * nd))
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or node.attr("output_shape"):
        raise UnsupportedOpError(
            f"ConvTranspose with auto_pad/output_shape at {node.where()}: give explicit pads")
    pads = list(node.attr("pads", [0] * (2 * nd))) or [0] * (2 * nd)
    y = fn(x, w, b, strides, 0, out_pad, groups, dil)
    # ONNX pads crop the full transposed-conv output.
    slices = [slice(None), slice(None)]
    for i in range(nd):
        slices.append(slice(pads[i], y.shape[2 + i] - pads[i + nd]))
    return y[tuple(slices)]


def batch_norm(node, inputs):
    x, scale, bias, mean, var = inputs[:5]
    eps = float(node.attr("epsilon", 1e-5))
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + eps)
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def gemm(node, inputs):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if node.attr("transA", 0):
        a = a.transpose(0, 1)
    if node.attr("transB", 0):
        b = b.transpose(0, 1)
    y = float(node.attr("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(node.attr("beta", 1.0)) * c
    return y


def matmul(node, inputs):
    return torch.matmul(inputs[0], inputs[1])
