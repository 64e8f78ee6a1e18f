"""Element-wise ops: exact inverses (BN Eq. 11, ReLU Eq. 12, LeakyReLU/PReLU Eq. 13), frozen gates,
arithmetic with a constant, and the shortcut Add/Sub of a residual segment."""
from __future__ import annotations

import torch

from ..errors import UnsupportedOpError
from ..rebuild.elementwise import SELU_ALPHA, SELU_GAMMA
from . import InverseRule
from .solver import SolveRecord


def _exact() -> SolveRecord:
    return SolveRecord(kind="exact")


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (a zero scale or gate abandons the neuron)."""
    den = den.expand_as(num) if den.shape != num.shape else den
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)),
                       torch.zeros_like(num))


# A frozen gate below this share of its tensor's largest gate counts as closed (docs/method.md
# "Gate floor"): dividing by it would amplify BPFM_out over 1000-fold, and such amplified values
# grow without bound through the inverses upstream (YOLOv8n's SiLU gates reach 1e-10 in its
# neck and the walk diverged at t = 1). Its Lambda is as small, so the maps lose nothing.
GATE_FLOOR = 1e-3


def open_gate(gate: torch.Tensor) -> torch.Tensor:
    """The gate with every value under GATE_FLOOR times its largest magnitude (in its image: dim
    0 of a batch) set to 0 (closed: ``safe_div`` abandons those neurons)."""
    if not gate.numel():
        return gate
    size = gate.abs()
    top = size.amax(dim=tuple(range(1, gate.dim())), keepdim=True) if gate.dim() > 1 else size.max()
    return torch.where(size >= GATE_FLOOR * top, gate, torch.zeros_like(gate))


class BatchNormRule(InverseRule):
    summary = "exact element-wise affine (Eq. 11); a zero scale abandons its channel"

    def invert(self, ctx):
        node, env = ctx.node, ctx.env
        x = node.inputs[0]
        scale, bias, mean, var = (env[t] for t in node.inputs[1:5])
        eps = float(node.attr("epsilon", 1e-5))
        shape = [1, -1] + [1] * (env[x].dim() - 2)
        s = (scale / torch.sqrt(var + eps)).reshape(shape)
        y = ctx.bpfm_out[ctx.output()]
        x_hat = safe_div(y - bias.reshape(shape), s) + mean.reshape(shape)
        x_hat = torch.where(s.expand_as(x_hat) != 0, x_hat, torch.zeros_like(x_hat))
        return {x: x_hat}, _exact()


class PassThroughRule(InverseRule):
    """ReLU and Clip (ReLU6): x_hat = BPFM_out; inactive/saturated neurons have Lambda = 0."""
    summary = "pass-through (Eq. 12): x_hat = BPFM_out, inactive or saturated neurons abandoned"

    def invert(self, ctx):
        return {ctx.node.inputs[0]: ctx.bpfm_out[ctx.output()]}, _exact()


class LeakyReluRule(InverseRule):
    summary = "exact inverse of a piecewise activation (Eq. 13)"

    def invert(self, ctx):
        node, y = ctx.node, ctx.bpfm_out[ctx.output()]
        if node.op_type == "LeakyRelu":
            slope = torch.tensor(float(node.attr("alpha", 0.01)), dtype=y.dtype, device=y.device)
        elif node.op_type == "PRelu":
            slope = ctx.env[node.inputs[1]]
            if slope.dim() == 1 and y.dim() > 2 and slope.numel() == y.shape[1]:
                slope = slope.reshape([1, -1] + [1] * (y.dim() - 2))
        elif node.op_type == "Elu":  # y = alpha (e^x - 1) for x < 0
            alpha = float(node.attr("alpha", 1.0))
            neg = torch.log1p(torch.clamp(y / alpha, min=-1 + 1e-7))
            return {node.inputs[0]: torch.where(y >= 0, y, neg)}, _exact()
        else:  # Selu: y = gamma x for x > 0, gamma alpha (e^x - 1) otherwise
            alpha, gamma = float(node.attr("alpha", SELU_ALPHA)), float(node.attr("gamma", SELU_GAMMA))
            neg = torch.log1p(torch.clamp(y / (gamma * alpha), min=-1 + 1e-7))
            return {node.inputs[0]: torch.where(y >= 0, y / gamma, neg)}, _exact()
        return {node.inputs[0]: torch.where(y >= 0, y, safe_div(y, slope * torch.ones_like(y)))}, _exact()


class SquashRule(InverseRule):
    """Sigmoid / Tanh / HardSigmoid / Softplus on the data path: their exact inverse on the open range."""
    summary = "exact inverse of a monotone activation on its open range"

    def invert(self, ctx):
        node, y = ctx.node, ctx.bpfm_out[ctx.output()]
        eps = 1e-6
        if node.op_type == "Sigmoid":
            x = torch.logit(y.clamp(eps, 1 - eps))
        elif node.op_type == "Tanh":
            x = torch.atanh(y.clamp(-1 + eps, 1 - eps))
        elif node.op_type == "Softplus":  # y = log(1 + e^x) > 0
            y = y.clamp(min=eps)
            x = y + torch.log(-torch.expm1(-y))
        else:
            alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
            x = (y - beta) / alpha
        return {node.inputs[0]: x}, _exact()


class ArithmeticRule(InverseRule):
    """Add/Sub/Mul/Div. With one data operand (the other constant): exact inverse. Add/Sub of two
    data operands (a residual join): the operand not in ``ctx.known`` is ``BPFM_out - known``
    (METHOD.md §5). With a frozen operand (``ctx.gate``: a sigmoid gate, the g of a self-gated
    activation, a normalisation statistic; ``graph.frozen_operands``) it is held at its forward
    value like a constant: x_hat = BPFM_out / gate, and so on."""
    summary = ("arithmetic: exact with a constant operand; a frozen operand (a Sigmoid/HardSigmoid "
               "gate of SE, CBAM, BAM; the g of a decomposed self-gated activation; a normalisation "
               "statistic) is held at its forward value and its branch gets no BPFM; of two data "
               "tensors, Add/Sub with a known shortcut is a residual join, else Add/Sub/Mul/Div is "
               "a fan-in: joint least squares over both branches (METHOD.md §5)")

    def invert(self, ctx):
        node, env = ctx.node, ctx.env
        y = ctx.bpfm_out[ctx.output()]
        a, b = node.inputs[0], node.inputs[1]
        op = node.op_type
        if ctx.gate is not None:
            x = a if b == ctx.gate else b
            frozen = env[ctx.gate]
            if node.op_type == "Mul":   # a gate (SE/CBAM/BAM, the g of a decomposed self-gate)
                frozen = open_gate(frozen)
            return {x: self._with_constant(node, x, a, frozen, env[x], y)}, _exact()
        if len(ctx.data_inputs) == 2:
            if op not in ("Add", "Sub"):
                raise UnsupportedOpError(f"{node.where()}: {op} of two data tensors (neither a "
                                         "sigmoid gate) has no inverse rule")
            if a in ctx.known:
                other, val = b, (y - ctx.known[a]) if op == "Add" else (ctx.known[a] - y)
            elif b in ctx.known:
                other, val = a, (y - ctx.known[b]) if op == "Add" else (y + ctx.known[b])
            else:
                raise UnsupportedOpError(f"{node.where()}: neither operand of the join is known")
            return {other: val}, _exact()
        if len(ctx.data_inputs) == 1 and a == b:
            raise UnsupportedOpError(f"{node.where()}: {op} of a tensor with itself has no inverse rule")
        x = ctx.data_inputs[0]
        return {x: self._with_constant(node, x, a, env[b] if x == a else env[a], env[x], y)}, _exact()

    @staticmethod
    def _with_constant(node, x: str, a: str, c: torch.Tensor, x0: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
        """The exact inverse of ``y = x op c`` (or ``c op x``) for x, c held fixed."""
        op = node.op_type
        if x0.shape != y.shape:
            raise UnsupportedOpError(f"{node.where()}: {op} broadcasts its data operand "
                                     f"{tuple(x0.shape)} to {tuple(y.shape)}: no inverse rule")
        if op == "Add":
            return y - c
        if op == "Sub":
            return y + c if x == a else c - y
        if op == "Mul":
            return safe_div(y, c)
        if x == a:  # Div: y = x / c
            return y * c
        raise UnsupportedOpError(f"{node.where()}: division by a data tensor has no inverse rule")


class VariadicRule(InverseRule):
    """Sum/Mean: the one operand neither constant nor in ``ctx.known`` is solved exactly (a join
    when the others are known, METHOD.md §5). Max/Min with one data operand (the others
    constant): x_hat = BPFM_out; where a constant was selected Lambda = 0 abandons the neuron
    (Max(x, 0) is a ReLU, Min(Max(x, 0), 6) a ReLU6)."""
    summary = ("variadic: Sum/Mean solve their one unknown operand exactly (k unknown: a fan-in); Max/Min against "
               "constants pass BPFM_out through (Max(x, 0) is a ReLU)")

    def invert(self, ctx):
        node, env = ctx.node, ctx.env
        y = ctx.bpfm_out[ctx.output()]
        unknown = [t for t in ctx.data_inputs if t not in ctx.known]
        if len(unknown) != 1 or node.inputs.count(unknown[0]) != 1:
            raise UnsupportedOpError(f"{node.where()}: {node.op_type} with {len(unknown)} unknown "
                                     "data operands has no inverse rule")
        x = unknown[0]
        if env[x].shape != y.shape:
            raise UnsupportedOpError(f"{node.where()}: {node.op_type} broadcasts its data operand "
                                     f"{tuple(env[x].shape)} to {tuple(y.shape)}: no inverse rule")
        if node.op_type in ("Max", "Min"):
            if len(ctx.data_inputs) != 1:
                raise UnsupportedOpError(f"{node.where()}: {node.op_type} of several data tensors "
                                         "has no inverse rule")
            return {x: y}, _exact()
        x_hat = y * len(node.inputs) if node.op_type == "Mean" else y
        for t in node.inputs:
            if t != x:
                x_hat = x_hat - ctx.known.get(t, env[t])
        return {x: x_hat}, _exact()
