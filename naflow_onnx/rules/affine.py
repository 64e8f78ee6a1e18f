"""Affine ops: anchored least squares, x_hat = A_in + J^+ (BPFM_out - A_out) (METHOD.md §4)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from . import InverseRule, RuleContext, rule
from .solver import LinearMap, SolveRecord, solve_affine


def _single_input(ctx: RuleContext) -> str:
    if len(ctx.data_inputs) != 1:
        raise UnsupportedOpError(f"{ctx.node.where()}: affine rule needs one data input "
                                 f"(weights constant), got {len(ctx.data_inputs)}")
    return ctx.data_inputs[0]


class ConvMap(LinearMap):
    """J of a Conv (symmetric pads) without autograd: conv2d forward, conv2d_input backward."""

    def __init__(self, node, x0, w, y0):
        self.x0, self.y0, self.w = x0.detach(), y0.detach(), w
        self.stride = list(node.attr("strides", [1, 1]))
        self.dil = list(node.attr("dilations", [1, 1]))
        self.pad = list(node.attr("pads", [0, 0, 0, 0]))[:2]
        self.groups = int(node.attr("group", 1))

    @staticmethod
    def applies(node, x0) -> bool:
        pads = list(node.attr("pads", [0, 0, 0, 0]))
        return (x0.dim() == 4 and node.attr("auto_pad", "NOTSET") == "NOTSET"
                and pads[:2] == pads[2:])

    def matvec(self, v):
        return F.conv2d(v, self.w, None, self.stride, self.pad, self.dil, self.groups)

    def rmatvec(self, u):
        return torch.nn.grad.conv2d_input(self.x0.shape, self.w, u, self.stride, self.pad,
                                          self.dil, self.groups)


def pointwise_pinv(W: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Damped pseudo-inverse (C_in x C_out) of a C_out x C_in matrix, and its largest singular value."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    lam = damp * float(S[0]) if damp > 0 else 0.0
    cutoff = float(S[0]) * max(W.shape) * torch.finfo(torch.float32).eps
    inv = torch.where(S > cutoff, S / (S * S + lam * lam), torch.zeros_like(S))
    return (Vh.T * inv) @ U.T, float(S[0])


def pointwise_conv_inverse(x0, w, y_target, y0, damp: float, cache: dict | None = None, key=None):
    """Closed form for a 1x1, stride-1, unpadded, ungrouped Conv: per-pixel damped pinv of W."""
    W = w.reshape(w.shape[0], w.shape[1]).double()
    memo = cache.get(("pinv", key, damp)) if cache is not None else None
    if memo is None:
        memo = pointwise_pinv(W, damp)
        if cache is not None:
            cache[("pinv", key, damp)] = memo
    P, s_max = memo
    lam = damp * s_max if damp > 0 else 0.0
    delta = (y_target - y0).double()
    dx = torch.einsum("io,nohw->nihw", P, delta)
    # exact normal-equation residual and misfit of the closed form, for the record
    Jdx = torch.einsum("oi,nihw->nohw", W, dx)
    res = torch.einsum("oi,nohw->nihw", W, Jdx - delta) + lam * lam * dx
    ref = torch.linalg.vector_norm(torch.einsum("oi,nohw->nihw", W, delta))
    dnorm = float(torch.linalg.vector_norm(delta))
    rec = SolveRecord(kind="closed-form", iterations=0,
                      convergence=float(torch.linalg.vector_norm(res) / ref) if ref > 0 else 0.0,
                      misfit=float(torch.linalg.vector_norm(Jdx - delta)) / dnorm if dnorm else 0.0,
                      damp=damp, sigma=s_max)
    return (x0.double() + dx).to(x0.dtype), rec


@rule
class AffineRule(InverseRule):
    op_types = ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool", "GlobalAveragePool",
                "ReduceMean", "ReduceSum", "Pad", "Resize", "Upsample")

    def invert(self, ctx: RuleContext):
        name = _single_input(ctx)
        node = ctx.node
        x0 = ctx.env[name]
        out = ctx.output()
        if node.op_type == "Pad" and node.attr("mode", "constant") != "constant":
            raise UnsupportedOpError(f"{node.where()}: Pad mode '{node.attr('mode')}' is not "
                                     "affine-invertible by this rule")
        if (node.op_type == "Conv" and ctx.opts.conv_inverse == "lsq" and name == node.inputs[0]
                and self._pointwise(node, ctx) and not math.isinf(ctx.opts.damp)):
            return self._pointwise_result(ctx, name, out)
        J, key = None, None
        if (node.op_type == "Conv" and name == node.inputs[0] and ctx.opts.conv_inverse == "lsq"
                and ConvMap.applies(node, x0)):
            J = ConvMap(node, x0, ctx.env[node.inputs[1]], ctx.env[out])
            key = (node.index, tuple(x0.shape))
        x_hat, rec = solve_affine(ctx.fn_of(name, out), x0, ctx.bpfm_out[out], ctx.opts,
                                  node.where(), J=J, sigma_key=key)
        return {name: x_hat}, rec

    @staticmethod
    def _pointwise(node, ctx) -> bool:
        w = ctx.env[node.inputs[1]]
        return (w.dim() == 4 and tuple(w.shape[2:]) == (1, 1) and int(node.attr("group", 1)) == 1
                and all(s == 1 for s in node.attr("strides", [1, 1]))
                and all(p == 0 for p in node.attr("pads", [0, 0, 0, 0]))
                and node.attr("auto_pad", "NOTSET") in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
                and all(d == 1 for d in node.attr("dilations", [1, 1])))

    @staticmethod
    def _pointwise_result(ctx, name, out):
        x_hat, rec = pointwise_conv_inverse(ctx.env[name], ctx.env[ctx.node.inputs[1]],
                                            ctx.bpfm_out[out], ctx.env[out], ctx.opts.damp,
                                            ctx.opts.cache, ctx.node.index)
        return {name: x_hat}, rec
