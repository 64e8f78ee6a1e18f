"""Shape and layout ops, including the Shape/Gather/Concat arithmetic torch exporters emit."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx import TensorProto

from ..errors import UnsupportedOpError
from . import ints, scalar
from .conv import torch_pad

DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
          TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16,
          TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
          TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8,
          TensorProto.UINT8: torch.uint8, TensorProto.BOOL: torch.bool}


def constant(node, inputs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            v = node.attrs[key]
            if isinstance(v, torch.Tensor):
                return v
            dtype = torch.float32 if "float" in key else torch.int64
            return torch.tensor(v, dtype=dtype)
    raise UnsupportedOpError(f"Constant without a numeric value at {node.where()}")


def constant_of_shape(node, inputs):
    value = node.attr("value", torch.zeros(1, dtype=torch.float32))
    return torch.full(ints(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


def cast(node, inputs):
    to = int(node.attr("to"))
    if to not in DTYPES:
        raise UnsupportedOpError(f"Cast to ONNX type {to} at {node.where()}")
    return inputs[0].to(DTYPES[to])


def shape(node, inputs):
    dims = list(inputs[0].shape)
    start, end = node.attr("start", 0), node.attr("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


def size(node, inputs):
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


def reshape(node, inputs):
    x, target = inputs[0], ints(inputs[1]) if node.opset >= 5 else list(node.attr("shape"))
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def flatten(node, inputs):
    x = inputs[0]
    axis = int(node.attr("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    lead = 1
    for d in x.shape[:axis]:
        lead *= d
    return x.reshape(lead, -1)


def transpose(node, inputs):
    x = inputs[0]
    perm = list(node.attr("perm", list(reversed(range(x.dim())))))
    return x.permute(perm)


def _axes(node, inputs):
    if node.opset >= 13:
        return ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else []
    return list(node.attr("axes", []))


def squeeze(node, inputs):
    x = inputs[0]
    axes = [a % x.dim() for a in _axes(node, inputs)] or [i for i, d in enumerate(x.shape) if d == 1]
    for a in sorted(axes, reverse=True):
        x = x.squeeze(a)
    return x


def unsqueeze(node, inputs):
    x = inputs[0]
    axes = _axes(node, inputs)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def concat(node, inputs):
    parts = [t for t in inputs if t is not None and (t.dim() > 0 and t.numel() > 0 or t.dim() > 1)]
    dtype = parts[0].dtype
    return torch.cat([t.to(dtype) for t in parts], dim=int(node.attr("axis")))


def split(node, inputs):
    x = inputs[0]
    axis = int(node.attr("axis", 0))
    if node.opset >= 13 and len(inputs) > 1 and inputs[1] is not None:
        sizes = ints(inputs[1])
    elif node.opset < 13 and node.attr("split"):
        sizes = list(node.attr("split"))
    else:
        n = int(node.attr("num_outputs", len(node.outputs)))
        full = x.shape[axis]
        chunk = -(-full // n)
        sizes = [min(chunk, full - i * chunk) for i in range(n)]
    return list(torch.split(x, sizes, dim=axis))


def slice_(node, inputs):
    x = inputs[0]
    if node.opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = list(node.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        n = x.shape[a]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            index[a] = slice(s, e, st)
        else:  # negative step: slice the reversed axis
            s = max(0, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            index[a] = slice(n - 1 - s, n - 1 - e, -st)
            flips.append(a)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


def gather(node, inputs):
    x, idx = inputs
    axis = int(node.attr("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    if idx.dim() == 0:
        return x.select(axis, int(idx))
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


def expand(node, inputs):
    x, target = inputs[0], ints(inputs[1])
    return torch.broadcast_to(x, torch.broadcast_shapes(tuple(x.shape), tuple(target)))


def tile(node, inputs):
    return inputs[0].repeat(ints(inputs[1]))


def range_(node, inputs):
    return torch.arange(scalar(inputs[0]), scalar(inputs[1]), scalar(inputs[2]),
                        dtype=inputs[0].dtype)


def pad(node, inputs):
    x = inputs[0]
    if node.opset < 11:
        pads, value = list(node.attr("pads")), float(node.attr("value", 0.0))
        axes = list(range(x.dim()))
    else:
        pads = ints(inputs[1])
        value = scalar(inputs[2], 0.0) if len(inputs) > 2 else 0.0
        axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    n = len(axes)
    for i, a in enumerate(axes):
        a %= x.dim()
        full[a], full[a + x.dim()] = pads[i], pads[i + n]
    if any(p < 0 for p in full):
        raise UnsupportedOpError(f"Pad with negative pads at {node.where()}")
    mode = node.attr("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pad(full), value=float(value))
    # torch's non-constant modes only pad the trailing (spatial) dims
    spatial = full[2:x.dim()] + full[x.dim() + 2:]
    if any(full[:2]) or any(full[x.dim():x.dim() + 2]):
        raise UnsupportedOpError(f"Pad mode '{mode}' on batch/channel dims at {node.where()}")
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise UnsupportedOpError(f"Pad mode '{mode}' at {node.where()}")
    return F.pad(x, torch_pad(spatial), mode=torch_mode)
