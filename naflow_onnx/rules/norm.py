"""Normalisation layers and self-gated activations (METHOD.md §4): exact element-wise inverses
at the forward point.

- LayerNormalization / GroupNormalization / InstanceNormalization: the statistics are frozen at
  their forward values, ``x_hat = (BPFM_out - beta) / gamma * std + mean`` (like Eq. 11 for BN);
  an element whose gamma is 0 is abandoned, and the normalised tensor ``(BPFM_out - beta)/gamma``
  where Lambda_out is 0 (where the decomposed form abandons its own normalised tensor).
- HardSwish, Mish, Gelu, Swish (``y = x * g(x)``): the gate g is frozen at its forward value,
  ``x_hat = BPFM_out / g(A)``; where g(A) = 0 the neuron is abandoned.

Their decomposed forms (ReduceMean/Sub/Pow/Sqrt/Div chains, ``Mul(x, Sigmoid(x))``, ...) reach
the same inverses through the frozen operands of ``graph.plan`` and ``ArithmeticRule``.
"""
from __future__ import annotations

import torch

from ..rebuild.gated import GATES
from ..rebuild.norm import NORM_OPS, norm_terms
from . import InverseRule, rule
from .elementwise import safe_div
from .solver import SolveRecord


@rule
class NormRule(InverseRule):
    op_types = NORM_OPS

    def invert(self, ctx):
        node, env = ctx.node, ctx.env
        x = node.inputs[0]
        mean, std, gamma, beta = norm_terms(node, [env[t] if t else None for t in node.inputs])
        y = ctx.bpfm_out[node.outputs[0]]
        gamma = gamma.expand_as(y)
        n_hat = safe_div(y - beta, gamma)
        lam = ctx.lam_out.get(node.outputs[0])
        if lam is not None:
            # the normalised tensor n = (x - mean)/std is abandoned where its Lambda (gamma times
            # Lambda_out) is 0, as in the decomposed form, whose n is a tensor of its own
            n_hat = torch.where(lam != 0, n_hat, torch.zeros_like(n_hat))
        x_hat = n_hat * std + mean
        return {x: torch.where(gamma != 0, x_hat, torch.zeros_like(x_hat))}, SolveRecord(kind="exact")


@rule
class SelfGatedRule(InverseRule):
    op_types = tuple(GATES)

    def invert(self, ctx):
        node = ctx.node
        x = node.inputs[0]
        gate = GATES[node.op_type](node, ctx.env[x])
        return {x: safe_div(ctx.bpfm_out[ctx.output()], gate)}, SolveRecord(kind="exact")
