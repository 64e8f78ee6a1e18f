"""MaxPool, AveragePool, global pools, reductions, Resize/Upsample."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from . import ints
from .conv import spatial_pads, torch_pad


def _window(node, x):
    nd = x.dim() - 2
    kernel = list(node.attr("kernel_shape"))
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    pads = spatial_pads(node, x, kernel, strides, dil)
    return nd, kernel, strides, dil, pads


def _ceil_extra(x, nd, kernel, strides, dil, pads, ceil_mode):
    """Extra end padding so that a plain floor-mode window op gives ONNX's ceil_mode size."""
    extra = [0] * nd
    if not ceil_mode:
        return extra
    for i in range(nd):
        size = x.shape[2 + i] + pads[i] + pads[i + nd]
        eff = (kernel[i] - 1) * dil[i] + 1
        out = -(-(size - eff) // strides[i]) + 1
        # the last window must start inside the input or the begin padding (torch/ONNX rule)
        if (out - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
            out -= 1
        extra[i] = max((out - 1) * strides[i] + eff - size, 0)
    return extra


def max_pool_padded(node, x):
    """The padded input and window parameters for MaxPool (also used by its inverse rule)."""
    nd, kernel, strides, dil, pads = _window(node, x)
    extra = _ceil_extra(x, nd, kernel, strides, dil, pads, int(node.attr("ceil_mode", 0)))
    full = pads[:nd] + [p + e for p, e in zip(pads[nd:], extra)]
    xp = F.pad(x, torch_pad(full), value=float("-inf")) if any(full) else x
    return xp, kernel, strides, dil, full


def max_pool(node, inputs):
    x = inputs[0]
    if x.dim() != 4:
        raise UnsupportedOpError(f"MaxPool on a {x.dim()}-D tensor at {node.where()}")
    xp, kernel, strides, dil, _ = max_pool_padded(node, x)
    y = F.max_pool2d(xp, kernel, strides, 0, dil)
    if len(node.outputs) > 1 and node.outputs[1]:
        raise UnsupportedOpError(f"MaxPool with an Indices output at {node.where()}")
    return y


def average_pool(node, inputs):
    x = inputs[0]
    if x.dim() != 4:
        raise UnsupportedOpError(f"AveragePool on a {x.dim()}-D tensor at {node.where()}")
    nd, kernel, strides, dil, pads = _window(node, x)
    if any(d != 1 for d in dil):
        raise UnsupportedOpError(f"AveragePool with dilations at {node.where()}")
    extra = _ceil_extra(x, nd, kernel, strides, dil, pads, int(node.attr("ceil_mode", 0)))
    include = int(node.attr("count_include_pad", 0))
    area = float(kernel[0] * kernel[1])
    xp = F.pad(x, torch_pad(pads[:nd] + [p + e for p, e in zip(pads[nd:], extra)]))
    total = F.avg_pool2d(xp, kernel, strides, 0) * area
    if not any(pads) and not any(extra):
        return total / area
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    # padding counts in the divisor only when count_include_pad; a ceil overhang never does
    ones = F.pad(ones, torch_pad(pads), value=1.0 if include else 0.0)
    ones = F.pad(ones, torch_pad([0] * nd + extra))
    count = F.avg_pool2d(ones, kernel, strides, 0) * area
    return total / count


def global_average_pool(node, inputs):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def global_max_pool(node, inputs):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _reduce(fn):
    def run(node, inputs):
        x = inputs[0]
        axes_from_input = (node.op_type == "ReduceSum" and node.opset >= 13) or node.opset >= 18
        axes = ints(inputs[1]) if axes_from_input and len(inputs) > 1 else list(node.attr("axes", []))
        keep = bool(node.attr("keepdims", 1))
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [a % x.dim() for a in axes], keep)
    return run


reduce_mean = _reduce(lambda x, a, k: x.mean(dim=a, keepdim=k))
reduce_max = _reduce(lambda x, a, k: x.amax(dim=a, keepdim=k))
reduce_min = _reduce(lambda x, a, k: x.amin(dim=a, keepdim=k))
reduce_sum = _reduce(lambda x, a, k: x.sum(dim=a, keepdim=k))
reduce_l2 = _reduce(lambda x, a, k: torch.sqrt((x * x).sum(dim=a, keepdim=k)))


def _interpolate(node, x, out_size: list[int], mode: str, ctm: str):
    if mode == "nearest":
        nearest_mode = node.attr("nearest_mode", "round_prefer_floor")
        if ctm == "asymmetric" and nearest_mode == "floor":
            return F.interpolate(x, size=out_size, mode="nearest")
        if ctm in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn") or (
                ctm == "asymmetric" and all(o % i == 0 for o, i in zip(out_size, x.shape[2:]))):
            return F.interpolate(x, size=out_size, mode="nearest-exact" if ctm != "asymmetric" else "nearest")
        raise UnsupportedOpError(
            f"Resize nearest with coordinate_transformation_mode '{ctm}' / nearest_mode "
            f"'{nearest_mode}' at {node.where()}")
    if mode == "linear":
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        if ctm == "align_corners":
            return F.interpolate(x, size=out_size, mode=torch_mode, align_corners=True)
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, size=out_size, mode=torch_mode, align_corners=False)
    raise UnsupportedOpError(f"Resize mode '{mode}' with '{ctm}' at {node.where()}")


def resize(node, inputs):
    x = inputs[0]
    if node.opset < 11:
        scales, sizes = inputs[1], None
        ctm = "asymmetric"
    else:
        scales = inputs[2] if len(inputs) > 2 else None
        sizes = inputs[3] if len(inputs) > 3 else None
        ctm = node.attr("coordinate_transformation_mode", "half_pixel")
    if sizes is not None and sizes.numel():
        out_size = ints(sizes)[2:]
    else:
        s = [float(v) for v in scales.reshape(-1).tolist()]
        out_size = [int(d * f) for d, f in zip(x.shape[2:], s[2:])]
    return _interpolate(node, x, out_size, node.attr("mode", "nearest"), ctm)


def upsample(node, inputs):
    x = inputs[0]
    scales = list(node.attr("scales")) if node.opset < 9 else inputs[1].reshape(-1).tolist()
    out_size = [int(d * f) for d, f in zip(x.shape[2:], scales[2:])]
    return _interpolate(node, x, out_size, node.attr("mode", "nearest"), "asymmetric")
