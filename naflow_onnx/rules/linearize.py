"""J of a rebuilt subgraph (a joint segment, METHOD.md §5) at its forward point, linearised once.

``torch.func.jvp`` of the whole segment re-runs the segment's primal forward on every J·v, and
forward-mode AD of ``clamp`` costs as much as a convolution. Here each node of the segment is
linearised once per forward point instead:

- normalisation layers and self-gated activations: the diagonal with their statistics or gate
  frozen at the forward point (``rules/norm.py``), as their decomposed forms are linearised;
- element-wise ops with one tangent input (activations, Clip, BatchNormalization, Add/Sub/Mul/Div
  by a constant, ...): the diagonal ``f'(x0)``, taken from one JVP with a tangent of ones, so that
  the derivative convention at kinks is torch's own; J·v = d ⊙ v, Jᵀ·u = d ⊙ u;
- Conv with constant weights: the convolution without its bias (J·v), ``conv2d_input`` (Jᵀ·u);
- Add/Sub of two tangent tensors (the residual join): a sum, and its adjoint (reduced over any
  broadcast dimension); Mul of two tangent tensors (a gate computed from the segment input): the
  product rule at the forward values;
- any other node: ``torch.func.jvp`` / a ``torch.func.vjp`` closure of that node alone (its VJP
  closure is built once and reused).

Tangents flow only through tensors that depend on the segment input; everything else is read
from the forward activations. The result is the same linear map as autograd's Jacobian of the
segment (tests compare both; normalisation layers and self-gated activations excepted, whose
statistics and gates are frozen by design), applied at the cost of one linear pass instead of a forward pass
plus a tangent pass.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.func import jvp, vjp

from .. import ops
from ..rebuild import scalar
from .affine import ConvAdjoint
from .solver import LinearMap, batch_shape, flatten, unflatten



def _reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``t`` over the dimensions that broadcasting expanded to reach it from ``shape``."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _mask(node, env, x0, y0):
    """f'(x0) of Relu and Clip without a JVP, with the rebuild's convention at the kinks
    (relu: result > 0; Clip with both bounds is hardtanh: min < x < max; Clip with one bound is
    clamp: x >= min or x <= max; derivatives.yaml)."""
    if node.op_type == "Relu":
        return (y0 > 0).to(x0.dtype)
    if node.op_type == "Clip":
        if node.opset < 11:
            lo, hi = node.attr("min"), node.attr("max")
        else:
            ins = node.inputs
            lo = scalar(env[ins[1]]) if len(ins) > 1 and ins[1] else None
            hi = scalar(env[ins[2]]) if len(ins) > 2 and ins[2] else None
        if lo is not None and hi is not None and lo <= hi:
            return ((x0 > lo) & (x0 < hi)).to(x0.dtype)
        keep = torch.ones_like(x0, dtype=torch.bool)
        if lo is not None:
            keep &= x0 >= lo
        if hi is not None:
            keep &= x0 <= hi
        return keep.to(x0.dtype)
    return None


class _Step:
    __slots__ = ("kind", "ins", "outs", "data")

    def __init__(self, kind, ins, outs, data):
        self.kind, self.ins, self.outs, self.data = kind, ins, outs, data


def _node_fn(node, env, tangent_inputs, out_names):
    """The node as a function of its tangent inputs (others fixed at their forward values)."""
    def f(*xs):
        local = dict(zip(tangent_inputs, xs))
        args = [local[t] if t in local else (env[t] if t else None) for t in node.inputs]
        outs = node.run(args)
        res = tuple(outs[node.outputs.index(o)] for o in out_names)
        return res[0] if len(res) == 1 else res
    return f


class SegmentMap(LinearMap):
    """J of the nodes ``node_ids`` (forward order) from tensor ``input`` to tensor ``output``,
    with every other tensor at its value in ``env`` (the forward activations). ``output`` may be
    several tensors (a top segment ending in several final tensors): J's rows are theirs,
    flattened and concatenated."""

    def __init__(self, mg, env: dict, node_ids, input: str, output, images: int = 1):
        self.x0 = env[input].detach()
        self.images = images
        outputs = (output,) if isinstance(output, str) else tuple(output)
        if len(outputs) == 1:
            output = outputs[0]
            self.y0 = env[output].detach()
        else:
            self.y0 = flatten([env[o].detach() for o in outputs], images)
        self.input, self.output, self.outputs = input, output, outputs
        self._shapes = [tuple(env[o].shape) for o in outputs]
        self.steps: list[_Step] = []
        tangent = {input}
        for idx in node_ids:
            node = mg.nodes[idx]
            ins = [t for t in dict.fromkeys(node.inputs) if t in tangent]
            outs = [o for o in node.outputs if o and isinstance(env.get(o), torch.Tensor)
                    and env[o].is_floating_point()]
            if not ins or not outs:
                continue
            self.steps.append(self._linearise(node, env, ins, outs))
            tangent.update(outs)

    @staticmethod
    def _linearise(node, env, ins, outs) -> _Step:
        op = node.op_type
        rec = ops.record(node)
        frozen = getattr(rec.rule, "frozen_diagonal", None) if rec is not None else None
        if frozen is not None and ins == [node.inputs[0]] and outs[:1] == node.outputs[:1]:
            # normalisation layers and self-gated activations: frozen at the forward point like
            # their inverse rules and their decomposed forms (statistics, gate g)
            return _Step("diag", ins, outs[:1], frozen(node, env).detach())
        if (len(ins) == 1 and len(outs) == 1 and ops.is_elementwise(node)
                and env[outs[0]].shape == env[ins[0]].shape
                and len([o for o in node.outputs if o]) == 1):
            x0 = env[ins[0]]
            d = _mask(node, env, x0, env[outs[0]]) if ins[0] == node.inputs[0] else None
            if d is None:
                _, d = jvp(_node_fn(node, env, ins, outs), (x0,), (torch.ones_like(x0),))
                d = d.detach()
            if bool(torch.all(d == 1)):
                return _Step("copy", ins, outs, None)
            return _Step("diag", ins, outs, d)
        if op == "Conv" and ins == [node.inputs[0]] and len(outs) == 1:
            x0 = env[ins[0]]
            w = env[node.inputs[1]]
            pads = list(node.attr("pads", [0, 0, 0, 0]))
            if (x0.dim() == 4 and node.attr("auto_pad", "NOTSET") == "NOTSET"
                    and pads[:2] == pads[2:]):
                conv = (list(node.attr("strides", [1, 1])), pads[:2],
                        list(node.attr("dilations", [1, 1])), int(node.attr("group", 1)))
                return _Step("conv2d", ins, outs, (w, conv, ConvAdjoint(w, x0.shape, *conv)))
            lin = lambda v, node=node, w=w: node.run([v, w])[0]  # noqa: E731 - bias dropped: linear
            _, back = vjp(lin, x0)
            return _Step("linear", ins, outs, (lin, back))
        if op in ("Add", "Sub") and len(ins) == 2 and len(outs) == 1:
            shapes = tuple(tuple(env[t].shape) for t in ins)   # ins keep the node's order
            sign = -1.0 if op == "Sub" else 1.0
            return _Step("add2", ins, outs, (sign, shapes))
        if op == "Mul" and len(ins) == 2 and len(outs) == 1:
            a0, b0 = env[ins[0]], env[ins[1]]
            return _Step("mul2", ins, outs, (a0, b0))
        f = _node_fn(node, env, ins, outs)
        primals = tuple(env[t] for t in ins)
        _, back = vjp(f, *primals)
        return _Step("generic", ins, outs, (f, primals, back))

    # ------------------------------------------------------------------------------ J·v
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        tan = {self.input: v}
        for s in self.steps:
            kind = s.kind
            if kind == "diag":
                tan[s.outs[0]] = s.data * tan[s.ins[0]]
            elif kind == "copy":
                tan[s.outs[0]] = tan[s.ins[0]]
            elif kind == "conv2d":
                w, (stride, pad, dil, groups), _ = s.data
                tan[s.outs[0]] = F.conv2d(tan[s.ins[0]], w, None, stride, pad, dil, groups)
            elif kind == "linear":
                tan[s.outs[0]] = s.data[0](tan[s.ins[0]])
            elif kind == "add2":
                a, b = tan[s.ins[0]], tan[s.ins[1]]
                tan[s.outs[0]] = a + b if s.data[0] > 0 else a - b
            elif kind == "mul2":
                a0, b0 = s.data
                tan[s.outs[0]] = tan[s.ins[0]] * b0 + a0 * tan[s.ins[1]]
            else:
                f, primals, _ = s.data
                out = jvp(f, primals, tuple(tan[t] for t in s.ins))[1]
                for o, t in zip(s.outs, out if isinstance(out, tuple) else (out,)):
                    tan[o] = t
        if len(self.outputs) > 1:
            return flatten([tan[o] if o in tan else
                            torch.zeros(s, dtype=self.y0.dtype, device=self.y0.device)
                            for o, s in zip(self.outputs, self._shapes)], self.images)
        out = tan.get(self.output)
        return torch.zeros_like(self.y0) if out is None else out

    # ------------------------------------------------------------------------------ Jᵀ·u
    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        if len(self.outputs) > 1:
            cot = dict(zip(self.outputs, unflatten(u, self._shapes)))
        else:
            cot = {self.output: u}

        def give(name, value):
            have = cot.get(name)
            cot[name] = value if have is None else have + value

        for s in reversed(self.steps):
            gs = [cot.pop(o, None) for o in s.outs]
            if all(g is None for g in gs):
                continue
            kind = s.kind
            if kind == "diag":
                give(s.ins[0], s.data * gs[0])
            elif kind == "copy":
                give(s.ins[0], gs[0])
            elif kind == "conv2d":
                give(s.ins[0], s.data[2](gs[0]))
            elif kind == "linear":
                give(s.ins[0], s.data[1](gs[0])[0])
            elif kind == "add2":
                sign, shapes = s.data
                give(s.ins[0], _reduce_to(gs[0], shapes[0]))
                give(s.ins[1], _reduce_to(gs[0] if sign > 0 else -gs[0], shapes[1]))
            elif kind == "mul2":
                a0, b0 = s.data
                give(s.ins[0], _reduce_to(gs[0] * b0, a0.shape))
                give(s.ins[1], _reduce_to(gs[0] * a0, b0.shape))
            else:
                f, primals, back = s.data
                outs0 = [self._zeros_like_out(s, i, g) for i, g in enumerate(gs)]
                res = back(outs0[0] if len(outs0) == 1 else tuple(outs0))
                for t, g in zip(s.ins, res):
                    give(t, g)
        out = cot.get(self.input)
        return torch.zeros_like(self.x0) if out is None else out

    def restrict(self, index):
        """The map on the images ``index`` only (the forward values of every step cut), or None
        where a step is an autograd closure of the whole batch."""
        if any(s.kind in ("linear", "generic") for s in self.steps):
            return None
        n, m = self.images, len(index)

        def cut(t):
            return t[index] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t

        def shape(sh):
            return batch_shape(sh, m) if len(sh) and sh[0] == n else sh
        new = copy.copy(self)
        new.images, new.x0, new.y0 = m, self.x0[index], self.y0[index]
        new._shapes = [shape(sh) for sh in self._shapes]
        steps = []
        for s in self.steps:
            data = s.data
            if s.kind == "diag":
                data = cut(data)
            elif s.kind == "mul2":
                data = (cut(data[0]), cut(data[1]))
            elif s.kind == "add2":
                data = (data[0], tuple(shape(sh) for sh in data[1]))
            steps.append(_Step(s.kind, s.ins, s.outs, data))
        new.steps = steps
        return new

    @staticmethod
    def _zeros_like_out(step, i, g):
        if g is not None:
            return g
        f, primals, _ = step.data
        ref = f(*primals)
        ref = ref[i] if isinstance(ref, tuple) else ref
        return torch.zeros_like(ref)


def node_map(mg, env: dict, node, wrt: str, output: str, images: int = 1) -> SegmentMap:
    """J of one node's ``output`` in its input ``wrt`` at the forward point (others fixed)."""
    return SegmentMap(mg, env, [node.index], wrt, output, images)


def _restricted(maps, index):
    cut = [m.restrict(index) for m in maps]
    return None if any(c is None for c in cut) else cut


class StackedMap(LinearMap):
    """One input, several outputs: ``Δ -> [J_1 Δ; ...; J_m Δ]`` (a fan-out's consumers,
    METHOD.md §5), the outputs flattened and concatenated per image. ``y0`` is the stacked point
    the caller chose (each consumer's output with its other inputs at their BPFM)."""

    def __init__(self, maps: list[LinearMap], y0: list[torch.Tensor], images: int = 1):
        self.maps, self.x0, self.images = maps, maps[0].x0, images
        self.shapes = [tuple(m.y0.shape) for m in maps]
        self.y0 = flatten(y0, images)

    def matvec(self, v):
        return flatten([m.matvec(v) for m in self.maps], self.images)

    def rmatvec(self, u):
        parts = unflatten(u, self.shapes)
        out = self.maps[0].rmatvec(parts[0])
        for m, p in zip(self.maps[1:], parts[1:]):
            out = out + m.rmatvec(p)
        return out

    def restrict(self, index):
        maps = _restricted(self.maps, index)
        if maps is None:
            return None
        new = copy.copy(self)
        new.maps, new.x0, new.y0, new.images = maps, maps[0].x0, self.y0[index], len(index)
        new.shapes = [tuple(m.y0.shape) for m in maps]
        return new


class JointMap(LinearMap):
    """Several inputs, one output: ``[Δ_1; ...; Δ_k] -> Σ_i J_i Δ_i`` (a fan-in node, METHOD.md
    §5), the inputs flattened and concatenated per image into one vector."""

    def __init__(self, maps: list[LinearMap], y0: torch.Tensor, images: int = 1):
        self.maps, self.y0, self.images = maps, y0, images
        self.shapes = [tuple(m.x0.shape) for m in maps]
        self.x0 = flatten([m.x0 for m in maps], images)

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return unflatten(v, self.shapes)

    def matvec(self, v):
        parts = self.split(v)
        out = self.maps[0].matvec(parts[0])
        for m, p in zip(self.maps[1:], parts[1:]):
            out = out + m.matvec(p)
        return out

    def rmatvec(self, u):
        return flatten([m.rmatvec(u) for m in self.maps], self.images)

    def restrict(self, index):
        maps = _restricted(self.maps, index)
        if maps is None:
            return None
        new = copy.copy(self)
        new.maps, new.y0, new.images = maps, self.y0[index], len(index)
        new.shapes = [tuple(m.x0.shape) for m in maps]
        new.x0 = flatten([m.x0 for m in maps], len(index))
        return new
