"""Self-gated activations y = x * g(x): HardSwish, Mish (opset 18), Gelu (opset 20, exact and tanh),
Swish (opset 24). ``GATES`` holds each op's g, which the inverse rule (``rules/norm.py``) freezes
at the forward point (METHOD.md §4): one definition for the rebuild and the rule."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F



def _gelu_gate(node, x):
    if node.attr("approximate", "none") == "tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


GATES = {
    "HardSwish": lambda node, x: torch.clamp(x / 6.0 + 0.5, 0.0, 1.0),
    "Mish": lambda node, x: torch.tanh(F.softplus(x)),
    "Gelu": _gelu_gate,
    "Swish": lambda node, x: torch.sigmoid(float(node.attr("alpha", 1.0)) * x),
}


def hard_swish(node, inputs):
    return F.hardswish(inputs[0])


def mish(node, inputs):
    return F.mish(inputs[0])


def gelu(node, inputs):
    return F.gelu(inputs[0], approximate=node.attr("approximate", "none"))


def swish(node, inputs):
    return inputs[0] * GATES["Swish"](node, inputs[0])
