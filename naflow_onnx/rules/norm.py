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
from ..rebuild.norm import norm_terms
from . import InverseRule
from .elementwise import open_gate, safe_div
from .solver import SolveRecord


class NormRule(InverseRule):
    summary = ("normalisation: exact element-wise inverse with the statistics frozen at the forward "
               "point, x_hat = (BPFM_out - beta)/gamma * std + mean; gamma = 0 abandons")

    @staticmethod
    def frozen_diagonal(node, env) -> torch.Tensor:
        """J with the statistics frozen: gamma / std."""
        x0 = env[node.inputs[0]]
        _, std, gamma, _ = norm_terms(node, [env[t] if t else None for t in node.inputs])
        return (gamma / std).expand_as(x0)

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


class SelfGatedRule(InverseRule):
    summary = ("self-gated activation y = x * g(x): the gate frozen at its forward value, "
               "x_hat = BPFM_out / g(A); a closed gate (g(A) under 1e-3 of the largest) abandons")

    @staticmethod
    def frozen_diagonal(node, env) -> torch.Tensor:
        """J with the gate frozen: g(x0)."""
        return forward_gate(node, env)

    def invert(self, ctx):
        x = ctx.node.inputs[0]
        gate = open_gate(forward_gate(ctx.node, ctx.env))
        return {x: safe_div(ctx.bpfm_out[ctx.output()], gate)}, \
            SolveRecord(kind="exact")


def forward_gate(node, env) -> torch.Tensor:
    """g(A) of a self-gated activation y = x·g(x) as the forward pass computed it: y0 / A where
    A != 0 (so that a neuron whose output underflowed to 0 is abandoned, and g·x_hat gives back
    BPFM_out to float precision), the gate function where A = 0."""
    x0 = env[node.inputs[0]]
    g = GATES[node.op_type](node, x0)
    y0 = env.get(node.outputs[0])
    if y0 is None:
        return g
    nz = x0 != 0
    return torch.where(nz, y0 / torch.where(nz, x0, torch.ones_like(x0)), g)
