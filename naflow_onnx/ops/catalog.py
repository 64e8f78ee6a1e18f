"""Every op naflow supports: one ``register`` call per op (see the package docstring for how to
add one). The order here is the order of README's "Supported ops" table."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ..rebuild import conv as cv
from ..rebuild import elementwise as ew
from ..rebuild import pooling as pl
from ..rebuild import shape as sh
from ..rules.affine import AffineRule
from ..rebuild import gated as gt
from ..rebuild import norm as nm
from ..rules.elementwise import (ArithmeticRule, BatchNormRule, LeakyReluRule, PassThroughRule,
                                 SquashRule, VariadicRule)
from ..rules.norm import NormRule, SelfGatedRule
from ..rules.pooling import MaxPoolRule
from ..rules.structural import StructuralRule
from . import FEATURE, LAYOUT, Sample, register

AFFINE, BATCH_NORM, PASS, PIECEWISE = AffineRule(), BatchNormRule(), PassThroughRule(), LeakyReluRule()
SQUASH, SELF_GATE, ARITHMETIC, VARIADIC = SquashRule(), SelfGatedRule(), ArithmeticRule(), VariadicRule()
NORM = NormRule()
SELECT, STRUCTURAL = MaxPoolRule(), StructuralRule()

X4 = {"x": (1, 3, 6, 6)}           # the usual data input of a sample: N×C×H×W


def _randn(*shape):
    return lambda g: torch.randn(*shape, generator=g)


def _consts(**makers):
    """{name: generator -> tensor or a fixed tensor} -> a ``Sample.consts`` function."""
    return lambda g: {k: (m(g) if callable(m) else m) for k, m in makers.items()}


def _int64(*values):
    return torch.tensor(values, dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# affine: anchored least squares

register("Conv", cv.conv, rule=AFFINE, role=FEATURE, weight_inputs=(1, 2),
         note="(groups, dilations, pads, auto_pad)", samples=lambda: [
    Sample({"x": (1, 3, 6, 6)}, _consts(w=_randn(6, 3, 3, 3), b=_randn(6)),
           attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, kind="cgls", tol=1e-3,
           label="3x3 q>=p"),
    Sample({"x": (1, 4, 5, 5)}, _consts(w=_randn(7, 4, 1, 1)), attrs={"kernel_shape": [1, 1]},
           kind="closed-form", tol=1e-5, label="1x1 closed form"),
    Sample({"x": (1, 4, 8, 8)}, _consts(w=_randn(6, 4, 3, 3)), check="range", kind="cgls",
           attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
           label="strided q<p"),
    Sample({"x": (1, 4, 6, 6)}, _consts(w=_randn(4, 1, 3, 3)), check="range", tol=1e-3,
           attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 4}, label="depthwise"),
    Sample({"x": (1, 2, 7, 7)}, _consts(w=_randn(3, 2, 3, 3)), check="range",
           attrs={"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
           label="auto_pad"),
])
register("ConvTranspose", cv.conv_transpose, rule=AFFINE, role=FEATURE, weight_inputs=(1, 2),
         samples=lambda: [Sample({"x": (1, 3, 3, 3)}, _consts(w=_randn(3, 2, 2, 2)), tol=1e-3,
                                 attrs={"kernel_shape": [2, 2], "strides": [2, 2]})])
register("Gemm", cv.gemm, rule=AFFINE, weight_inputs=(1, 2), samples=lambda: [
    Sample({"x": (1, 8)}, _consts(w=_randn(3, 8), b=_randn(3)), attrs={"transB": 1},
           check="range")])
# MatMul: either operand may be the constant weight; the second is tried first
register("MatMul", cv.matmul, rule=AFFINE, weight_inputs=(1, 0), note="(constant weight)",
         samples=lambda: [Sample({"x": (1, 8)}, _consts(w=_randn(8, 3)), check="range"),
                          Sample({"x": (2, 3)}, _consts(w=_randn(5, 2)), inputs=("w", "x"),
                                 tol=1e-3, label="weight first")])
register("AveragePool", pl.average_pool, rule=AFFINE, role=LAYOUT, samples=lambda: [
    Sample(X4, attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, check="range"),
    Sample(X4, attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1,
                      "strides": [2, 2]}, check="range", label="pads ceil_mode")])
register("GlobalAveragePool", pl.global_average_pool, rule=AFFINE,
         samples=lambda: [Sample(X4, check="range")])
register("ReduceMean", pl.reduce_mean, rule=AFFINE, samples=lambda: [
    Sample(X4, attrs={"axes": [2, 3], "keepdims": 1}, check="range")])
register("ReduceSum", pl.reduce_sum, rule=AFFINE, samples=lambda: [
    Sample(X4, _consts(axes=_int64(1)), attrs={"keepdims": 0}, check="range")])
register("Pad", sh.pad, rule=AFFINE, role=LAYOUT, note="(constant)", samples=lambda: [
    Sample(X4, _consts(p=_int64(0, 0, 1, 2, 0, 0, 2, 1)), attrs={"mode": "constant"},
           tol=1e-5)])
register("Resize", pl.resize, rule=AFFINE, role=LAYOUT, samples=lambda: [
    Sample({"x": (1, 2, 3, 3)}, _consts(s=torch.tensor([1.0, 1.0, 2.0, 2.0])),
           inputs=("x", "", "s"), attrs={"mode": "nearest", "nearest_mode": "floor",
                                         "coordinate_transformation_mode": "asymmetric"}),
    Sample({"x": (1, 2, 3, 3)}, _consts(s=torch.tensor([1.0, 1.0, 2.0, 2.0])),
           inputs=("x", "", "s"), attrs={"mode": "linear"}, tol=1e-3, label="bilinear")])
register("Upsample", pl.upsample, rule=AFFINE, role=LAYOUT, samples=lambda: [
    Sample({"x": (1, 2, 3, 3)}, _consts(s=torch.tensor([1.0, 1.0, 2.0, 2.0])), opset=9,
           attrs={"mode": "nearest"})])

# ------------------------------------------------------------------------------------------------
# exact element-wise

register("BatchNormalization", cv.batch_norm, rule=BATCH_NORM, role=LAYOUT, elementwise=True,
         samples=lambda: [
    Sample(X4, _consts(s=torch.tensor([1.5, -0.7, 0.3]), b=_randn(3), m=_randn(3),
                       v=lambda g: torch.rand(3, generator=g) + 0.5),
           attrs={"epsilon": 1e-5}, tol=1e-5)])
register("Relu", ew.unary(torch.relu), rule=PASS, role=LAYOUT, elementwise=True,
         samples=lambda: [Sample(X4, check="range")])
register("Clip", ew.clip, rule=PASS, role=LAYOUT, elementwise=True, note="(ReLU6)",
         samples=lambda: [
    Sample(X4, _consts(lo=torch.tensor(0.0), hi=torch.tensor(0.5)), check="range"),
    Sample(X4, attrs={"min": -0.5, "max": 0.5}, opset=6, check="range", label="opset 6")])
register("LeakyRelu", ew.leaky_relu, rule=PIECEWISE, role=LAYOUT, elementwise=True,
         samples=lambda: [Sample(X4, attrs={"alpha": 0.2})])
register("PRelu", ew.prelu, rule=PIECEWISE, role=LAYOUT, elementwise=True, samples=lambda: [
    Sample(X4, _consts(slope=torch.tensor([0.1, 0.3, 2.0]).reshape(3, 1, 1)))])
register("Elu", ew.elu, rule=PIECEWISE, role=LAYOUT, elementwise=True,
         samples=lambda: [Sample(X4, attrs={"alpha": 0.7})])
register("Selu", ew.selu, rule=PIECEWISE, role=LAYOUT, elementwise=True,
         samples=lambda: [Sample(X4), Sample(X4, attrs={"alpha": 1.2, "gamma": 0.5})])
register("Sigmoid", ew.unary(torch.sigmoid), rule=SQUASH, role=LAYOUT, elementwise=True,
         gate_source=True, probability=True, samples=lambda: [Sample(X4)])
register("Tanh", ew.unary(torch.tanh), rule=SQUASH, role=LAYOUT, elementwise=True,
         samples=lambda: [Sample(X4)])
register("HardSigmoid", ew.hard_sigmoid, rule=SQUASH, role=LAYOUT, elementwise=True,
         gate_source=True, samples=lambda: [Sample(X4, check="range")])
register("Softplus", ew.unary(F.softplus), rule=SQUASH, role=LAYOUT, elementwise=True,
         samples=lambda: [Sample(X4)])
register("HardSwish", gt.hard_swish, rule=SELF_GATE, role=LAYOUT, elementwise=True,
         samples=lambda: [Sample(X4, check="frozen", scale=3.0)])  # both sides of ±3
register("Mish", gt.mish, rule=SELF_GATE, role=LAYOUT, elementwise=True, since=18,
         samples=lambda: [Sample(X4, check="frozen", scale=3.0, opset=18)])
register("Gelu", gt.gelu, rule=SELF_GATE, role=LAYOUT, elementwise=True, since=20,
         samples=lambda: [Sample(X4, check="frozen", scale=3.0, opset=20),
                          Sample(X4, check="frozen", scale=3.0, opset=20,
                                 attrs={"approximate": "tanh"}, label="tanh")])
register("Swish", gt.swish, rule=SELF_GATE, role=LAYOUT, elementwise=True, since=24,
         samples=lambda: [Sample(X4, check="frozen", scale=3.0, opset=24, attrs={"alpha": 1.5})])

# normalisation layers: statistics frozen at the forward point (METHOD.md §4)
register("LayerNormalization", nm.normalization, rule=NORM, role=LAYOUT, since=17,
         weight_inputs=(1, 2), samples=lambda: [
    Sample(X4, _consts(s=lambda g: torch.rand(6, generator=g) + 0.5, b=_randn(6)),
           attrs={"axis": -1, "epsilon": 1e-5}, tol=1e-4, check="point", label="last axis"),
    Sample(X4, _consts(s=lambda g: torch.rand(3, 6, 6, generator=g) + 0.5, b=_randn(3, 6, 6)),
           attrs={"axis": 1, "epsilon": 1e-5}, tol=1e-4, check="point", label="C, H, W")])
register("GroupNormalization", nm.normalization, rule=NORM, role=LAYOUT, since=18,
         weight_inputs=(1, 2), samples=lambda: [
    Sample({"x": (1, 4, 5, 5)}, _consts(s=lambda g: torch.rand(2, generator=g) + 0.5,
                                        b=_randn(2)),
           attrs={"num_groups": 2, "epsilon": 1e-5}, opset=18, tol=1e-4, check="point")])
register("InstanceNormalization", nm.normalization, rule=NORM, role=LAYOUT, since=6,
         weight_inputs=(1, 2), samples=lambda: [
    Sample(X4, _consts(s=lambda g: torch.rand(3, generator=g) + 0.5, b=_randn(3)),
           attrs={"epsilon": 1e-5}, tol=1e-4, check="point")])


def _arithmetic_samples(op: str) -> list[Sample]:
    """With a constant operand; Add/Sub of two data tensors (a residual join, one operand known);
    Mul by a gate (the sigmoid gate frozen)."""
    out = [Sample(X4, _consts(c=_randn(1, 3, 6, 6))),
           Sample(X4, _consts(c=_randn(3, 1, 1)), label="broadcast constant"),
           Sample(X4, _consts(c=_randn(1, 3, 1, 1)), inputs=("c", "x"), label="constant first")]
    if op in ("Add", "Sub"):
        out += [Sample({"a": (1, 3, 6, 6), "b": (1, 3, 6, 6)}, known=(k,), label=f"join, {k} known")
                for k in ("a", "b")]
    if op == "Mul":
        out.append(Sample(X4, _consts(g=lambda g: torch.sigmoid(torch.randn(1, 3, 1, 1, generator=g))),
                          gate="g", check="range", label="gate"))
    return out


for _op, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}.items():
    register(_op, ew.binary(_fn), rule=ARITHMETIC, role=LAYOUT, elementwise=True,
             join=_op != "Mul", gate_path=True, scaled_copy=True, freezable=True, fan_in=True,
             samples=lambda _op=_op: _arithmetic_samples(_op))
register("Div", ew.div, rule=ARITHMETIC, role=LAYOUT, elementwise=True, gate_path=True,
         scaled_copy=True, freezable=True, fan_in=True,
         samples=lambda: [Sample(X4, _consts(c=lambda g: torch.rand(1, 3, 1, 1, generator=g) + 0.5))])

# ------------------------------------------------------------------------------------------------
# variadic, selection, copies

for _op in ("Sum", "Mean", "Max", "Min"):
    register(_op, ew.variadic, rule=VARIADIC, role=LAYOUT, join=_op in ("Sum", "Mean"),
             fan_in=_op in ("Sum", "Mean"),
             samples=lambda _op=_op: [
        Sample(X4, _consts(c=_randn(1, 3, 6, 6), d=_randn(3, 1, 1)),
               check="range" if _op in ("Max", "Min") else "injective"),
        Sample(X4, _consts(c=torch.tensor(0.0)), inputs=("c", "x"),
               check="range" if _op in ("Max", "Min") else "injective", label="scalar first"),
    ] + ([Sample({"a": (1, 3, 6, 6), "b": (1, 3, 6, 6)}, known=("a",), label="join")]
         if _op in ("Sum", "Mean") else []))
register("MaxPool", pl.max_pool, rule=SELECT, role=LAYOUT, note="(ceil_mode, pads)",
         samples=lambda: [
    Sample(X4, attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, check="selection"),
    Sample({"x": (1, 2, 7, 7)}, attrs={"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1,
                                       "pads": [1, 1, 1, 1]}, check="selection",
           label="overlapping, pads, ceil_mode")])
register("GlobalMaxPool", pl.global_max_pool, rule=SELECT,
         samples=lambda: [Sample(X4, check="selection")])
register("Identity", ew.identity, rule=STRUCTURAL, role=LAYOUT, elementwise=True,
         gate_path=True, shape_only=True, scaled_copy=True, samples=lambda: [Sample(X4)])
register("Dropout", ew.identity, rule=STRUCTURAL, role=LAYOUT, elementwise=True,
         shape_only=True, scaled_copy=True, samples=lambda: [Sample(X4)])
register("Cast", sh.cast, rule=STRUCTURAL, role=LAYOUT, gate_path=True, shape_only=True,
         scaled_copy=True, samples=lambda: [Sample(X4, attrs={"to": 1})])
register("Reshape", sh.reshape, rule=STRUCTURAL, gate_path=True, shape_only=True,
         samples=lambda: [Sample(X4, _consts(shape=_int64(1, 3, 36)))])
register("Flatten", sh.flatten, rule=STRUCTURAL, gate_path=True, shape_only=True,
         samples=lambda: [Sample(X4, attrs={"axis": 1})])
register("Transpose", sh.transpose, rule=STRUCTURAL,
         samples=lambda: [Sample(X4, attrs={"perm": [0, 2, 3, 1]})])
register("Squeeze", sh.squeeze, rule=STRUCTURAL, gate_path=True, shape_only=True,
         samples=lambda: [Sample({"x": (1, 3, 1, 1)}, _consts(axes=_int64(2, 3)))])
register("Unsqueeze", sh.unsqueeze, rule=STRUCTURAL, gate_path=True, shape_only=True,
         samples=lambda: [Sample({"x": (1, 3)}, _consts(axes=_int64(2, 3)))])
register("Concat", sh.concat, rule=STRUCTURAL, role=LAYOUT, samples=lambda: [
    Sample({"x": (1, 2, 3, 3), "z": (1, 3, 3, 3)}, attrs={"axis": 1}),
    Sample({"x": (1, 2, 3, 3)}, _consts(c=_randn(1, 2, 3, 3)), attrs={"axis": 2},
           label="with a constant")])
register("Split", sh.split, rule=STRUCTURAL, role=LAYOUT, samples=lambda: [
    Sample(X4, _consts(split=_int64(1, 2)), attrs={"axis": 1}, outputs=("y", "z"))])
register("Slice", sh.slice_, rule=STRUCTURAL, role=LAYOUT, samples=lambda: [
    Sample(X4, _consts(s=_int64(1, 0), e=_int64(5, 3), a=_int64(2, 1)), check="range"),
    Sample(X4, _consts(s=_int64(-1), e=_int64(-100), a=_int64(3), st=_int64(-2)), check="range",
           label="negative step")])

# ------------------------------------------------------------------------------------------------
# rebuilt only: heads, shape arithmetic, gate branches (no rule: refused between feature layers)

_POS = _consts(x=lambda g: torch.rand(1, 3, 4, 4, generator=g) + 0.1)   # a positive operand
_BOOLS = _consts(p=torch.tensor([True, False, True, False]), q=torch.tensor([True, True, False, False]))
_TWO = {"x": (1, 3, 4, 4), "c": (1, 3, 4, 4)}


def _tensor_attr(*values):
    return numpy_helper.from_array(torch.tensor(values, dtype=torch.float32).numpy(), "value")


register("Softmax", ew.softmax, probability=True, samples=lambda: [
    Sample(X4, attrs={"axis": 1}), Sample({"x": (2, 5)}, opset=11, label="opset 11")])
register("LogSoftmax", ew.log_softmax, probability=True,
         samples=lambda: [Sample({"x": (2, 5)})])
register("Expand", sh.expand, gate_path=True, samples=lambda: [
    Sample({"x": (1, 3, 1, 1)}, _consts(shape=_int64(1, 3, 4, 5)))])
register("Tile", sh.tile, gate_path=True, samples=lambda: [
    Sample({"x": (1, 3, 2, 2)}, _consts(repeats=_int64(1, 1, 2, 3)))])
register("Shape", sh.shape, samples=lambda: [Sample(X4), Sample(X4, attrs={"start": 1, "end": -1})])
register("Size", sh.size, samples=lambda: [Sample(X4)])
register("Gather", sh.gather, samples=lambda: [
    Sample({"x": (2, 3, 4)}, _consts(i=_int64(0, 2, -1, 1).reshape(2, 2)), attrs={"axis": 1}),
    Sample({"x": (2, 3, 4)}, _consts(i=torch.tensor(1)), label="scalar index")])
register("Constant", sh.constant, samples=lambda: [
    Sample({}, attrs={"value": _tensor_attr(1.0, -2.0)}), Sample({}, attrs={"value_float": 0.5})])
register("ConstantOfShape", sh.constant_of_shape, samples=lambda: [
    Sample({}, _consts(shape=_int64(2, 3)), attrs={"value": _tensor_attr(1.5)})])
register("Range", sh.range_, samples=lambda: [
    Sample({}, _consts(a=torch.tensor(1.0), b=torch.tensor(7.5), d=torch.tensor(2.0)))])
register("Where", ew.where, samples=lambda: [
    Sample({"x": (2, 4), "c": (2, 4)}, _consts(p=torch.tensor([True, False, False, True])),
           inputs=("p", "x", "c"))])
register("ReduceMax", pl.reduce_max, samples=lambda: [Sample(X4, attrs={"axes": [1]})])
register("ReduceMin", pl.reduce_min, samples=lambda: [Sample(X4, attrs={"keepdims": 0})])
register("ReduceL2", pl.reduce_l2, samples=lambda: [Sample(X4, attrs={"axes": [2, 3]})])
register("LpNormalization", ew.lp_normalization, samples=lambda: [Sample(X4, attrs={"axis": 1})])
for _op, _fn in {"Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg,
                 "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Erf": torch.erf}.items():
    register(_op, ew.unary(_fn), elementwise=True, samples=lambda: [Sample({}, _POS)])
for _op, _fn in {"Floor": torch.floor, "Ceil": torch.ceil}.items():
    register(_op, ew.unary(_fn), samples=lambda: [Sample(X4, scale=3.0)])
register("Not", ew.unary(torch.logical_not), samples=lambda: [Sample({}, _BOOLS, inputs=("p",))])
register("Pow", ew.binary(torch.pow), samples=lambda: [
    Sample({"c": (1, 3, 4, 4)}, _POS, inputs=("x", "c"))])
for _op, _fn in {"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt,
                 "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge}.items():
    register(_op, ew.binary(_fn), samples=lambda: [
        Sample(_TWO), Sample({"x": (1, 3, 4, 4)}, _consts(c=torch.tensor(0.0)), label="scalar")])
for _op, _fn in {"And": torch.logical_and, "Or": torch.logical_or}.items():
    register(_op, ew.binary(_fn), samples=lambda: [Sample({}, _BOOLS)])
