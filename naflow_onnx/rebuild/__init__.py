"""ONNX node -> torch function, files by op family. Which function serves which op is the op
registry's business (``naflow_onnx/ops/catalog.py``).

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


def _rebuild_fn(node: onnx.NodeProto, opset: int) -> OpFn | None:
    # the registry imports the op families of this package: asked at call time, not import time
    from ..ops import rebuild_fn
    return rebuild_fn(node.op_type, opset, node.domain)


def rebuild_node(node: onnx.NodeProto, index: int, opset: int) -> RebuiltNode:
    fn = _rebuild_fn(node, opset)
    if fn is None:
        dom = f" (domain '{node.domain}')" if node.domain not in ("", "ai.onnx") else ""
        raise UnsupportedOpError(
            f"unsupported op {node.op_type}{dom} at node '{node_name(node, index)}': no torch rebuild")
    return RebuiltNode(index=index, name=node_name(node, index), op_type=node.op_type,
                       inputs=list(node.input), outputs=list(node.output),
                       attrs={a.name: _decode_attr(a) for a in node.attribute}, opset=opset,
                       fn=fn)


def unsupported_nodes(nodes: list[onnx.NodeProto], opset: int) -> list[tuple[str, str]]:
    """(op type, node name) of every node without a torch rebuild at ``opset``."""
    return [(n.op_type, node_name(n, i)) for i, n in enumerate(nodes) if _rebuild_fn(n, opset) is None]


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

