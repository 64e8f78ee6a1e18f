"""Copies and permutations (Identity, Reshape, Transpose, Concat, Split, ...): J is a selection
matrix with orthonormal rows, so J^+ = J^T and the inverse is the op's own VJP."""
from __future__ import annotations

import torch
from torch.func import vjp

from . import InverseRule
from .solver import SolveRecord


class StructuralRule(InverseRule):
    summary = "copy / permutation / selection: the op's own transpose (J⁺ = Jᵀ)"

    def invert(self, ctx):
        node, env = ctx.node, ctx.env
        names = ctx.data_inputs
        float_outs = [o for o in node.outputs if o and env[o].is_floating_point()]

        def f(*xs):
            vals = dict(zip(names, xs))
            args = [vals.get(t, env.get(t)) if t else None for t in node.inputs]
            res = dict(zip(node.outputs, node.run(args)))
            return tuple(res[o] for o in float_outs)

        _, pullback = vjp(f, *(env[t] for t in names))
        cot = tuple(ctx.bpfm_out.get(o, torch.zeros_like(env[o])) for o in float_outs)
        grads = pullback(cot)
        return dict(zip(names, grads)), SolveRecord(kind="exact")
