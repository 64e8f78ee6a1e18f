"""ONNX node -> torch function. One registry keyed by op type; files by op family.

A rebuilt node runs on torch tensors, so autograd gives Lambda (importance) and the Jacobians the
inverse rules need. Every op function takes ``(node, inputs)`` where ``inputs`` is a list of
tensors (``None`` for an omitted optional input) and returns a tensor or a list of tensors, one
per node output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import UnsupportedOpError

OpFn = Callable[["RebuiltNode", list], "torch.Tensor | list[torch.Tensor]"]
OPS: dict[str, OpFn] = {}


def register(*op_types: str):
    """Register a torch implementation for one or more ONNX op types (default domain)."""

    def deco(fn: OpFn) -> OpFn:
        for op_type in op_types:
            OPS[op_type] = fn
        return fn

    return deco


@dataclass
class RebuiltNode:
    """One ONNX node with its attributes decoded and its torch implementation bound."""

    index: int
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict
    opset: int
    fn: OpFn = field(repr=False)

    def attr(self, key: str, default=None):
        return self.attrs.get(key, default)

    def run(self, values: list) -> list[torch.Tensor]:
        out = self.fn(self, values)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def where(self) -> str:
        return f"node '{self.name}' ({self.op_type}, opset {self.opset})"


def _decode_attr(a: onnx.AttributeProto):
    value = helper.get_attribute_value(a)
    if a.type == onnx.AttributeProto.TENSOR:
        return torch.from_numpy(numpy_helper.to_array(value).copy())
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


def node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def rebuild_node(node: onnx.NodeProto, index: int, opset: int) -> RebuiltNode:
    if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
        dom = f" (domain '{node.domain}')" if node.domain not in ("", "ai.onnx") else ""
        raise UnsupportedOpError(
            f"unsupported op {node.op_type}{dom} at node '{node_name(node, index)}': no torch rebuild")
    return RebuiltNode(index=index, name=node_name(node, index), op_type=node.op_type,
                       inputs=list(node.input), outputs=list(node.output),
                       attrs={a.name: _decode_attr(a) for a in node.attribute}, opset=opset,
                       fn=OPS[node.op_type])


def unsupported_nodes(nodes: list[onnx.NodeProto]) -> list[tuple[str, str]]:
    """(op type, node name) of every node without a torch rebuild."""
    return [(n.op_type, node_name(n, i)) for i, n in enumerate(nodes)
            if n.domain not in ("", "ai.onnx") or n.op_type not in OPS]


def ints(t) -> list[int]:
    """An int64 shape/axes tensor (or list) as a Python list."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def scalar(t, default=None):
    if t is None:
        return default
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            return default
        return t.reshape(-1)[0].item()
    return t


# Importing the op families fills OPS.
from . import conv, elementwise, gated, norm, pooling, shape  # noqa: E402,F401
