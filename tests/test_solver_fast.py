"""The solver's fast paths (issue 6) compute the same linear maps and the same solutions as the
plain ones: the once-linearised segment map against torch.func on the whole segment, the conv
adjoints against conv2d_input, per-channel CGLS against the dense damped pseudo-inverse, and a
whole MobileNetV2-like flow against ``Analyzer(reference_solver=True)``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

import naflow_onnx as nf
from naflow_onnx.rebuild import rebuild_node
from naflow_onnx.rules.affine import ConvAdjoint, ConvMap
from naflow_onnx.rules.linearize import SegmentMap
from naflow_onnx.rules.solver import LinearMap, SolverOptions, cgls, dense_solve, solve_affine


class _Graph:
    def __init__(self, nodes):
        self.nodes = nodes


def _segment(specs, env, opset=17):
    nodes = [rebuild_node(helper.make_node(op, ins, outs, **attrs), i, opset)
             for i, (op, ins, outs, attrs) in enumerate(specs)]
    for n in nodes:
        for name, value in zip(n.outputs, n.run([env.get(t) if t else None for t in n.inputs])):
            env[name] = value
    return _Graph(nodes), nodes


def _f(mg, env, nodes, inp, out):
    def f(x):
        local = dict(env)
        local[inp] = x
        for n in nodes:
            for name, value in zip(n.outputs, n.run([local.get(t) if t else None for t in n.inputs])):
                local[name] = value
        return local[out]
    return f


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def test_segment_map_equals_autograd_jacobian():
    """Every kind of step: conv (plain, strided, depthwise, asymmetric pads -> generic linear),
    Clip/Relu masks, BN, Add/Sub of two tangents with broadcast, a sigmoid gate (Mul of two
    tangents), a global pool (generic), Add with a constant."""
    torch.manual_seed(0)
    d = torch.float64
    env = {
        "x": torch.randn(2, 4, 9, 9, dtype=d), "w1": torch.randn(8, 4, 1, 1, dtype=d),
        "w2": torch.randn(8, 1, 3, 3, dtype=d), "w3": torch.randn(4, 8, 1, 1, dtype=d),
        "w4": torch.randn(4, 4, 3, 3, dtype=d), "lo": torch.tensor(0.0, dtype=d),
        "hi": torch.tensor(1.5, dtype=d), "s": torch.rand(8, dtype=d) + 0.5,
        "b": torch.randn(8, dtype=d), "m": torch.randn(8, dtype=d), "v": torch.rand(8, dtype=d) + 0.5,
        "c": torch.randn(1, 4, 1, 1, dtype=d),
    }
    specs = [
        ("Conv", ["x", "w1"], ["e"], {"kernel_shape": [1, 1]}),
        ("BatchNormalization", ["e", "s", "b", "m", "v"], ["bn"], {}),
        ("Clip", ["bn", "lo", "hi"], ["c1"], {}),
        ("Conv", ["c1", "w2"], ["dw"], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 8}),
        ("Relu", ["dw"], ["r1"], {}),
        ("GlobalAveragePool", ["r1"], ["gp"], {}),
        ("Sigmoid", ["gp"], ["g"], {}),
        ("Mul", ["r1", "g"], ["se"], {}),
        ("Conv", ["se", "w3"], ["p"], {"kernel_shape": [1, 1]}),
        ("Conv", ["x", "w4"], ["side"], {"kernel_shape": [3, 3], "pads": [0, 0, 2, 2]}),
        ("Sub", ["p", "side"], ["d"], {}),
        ("Add", ["d", "x"], ["a"], {}),
        ("Add", ["a", "c"], ["y"], {}),
    ]
    mg, nodes = _segment(specs, env)
    J = SegmentMap(mg, env, range(len(nodes)), "x", "y")
    kinds = {s.kind for s in J.steps}
    assert {"conv2d", "diag", "generic", "add2", "mul2", "linear", "copy"} <= kinds, kinds
    ref = LinearMap(_f(mg, env, nodes, "x", "y"), env["x"])
    assert torch.equal(J.y0, ref.y0)
    for _ in range(3):
        v, u = torch.randn_like(env["x"]), torch.randn_like(env["y"])
        assert _rel(J.matvec(v), ref.matvec(v)) < 1e-12
        assert _rel(J.rmatvec(u), ref.rmatvec(u)) < 1e-12


@pytest.mark.parametrize("ci,co,groups,k,stride,pad,dil", [
    (6, 12, 1, 1, 1, 0, 1), (6, 12, 1, 1, 2, 0, 1), (6, 12, 3, 1, 2, 0, 1),
    (8, 8, 8, 3, 1, 1, 1), (8, 8, 8, 3, 1, 0, 1), (8, 8, 8, 5, 1, 2, 1), (8, 8, 8, 3, 1, 2, 2),
    (8, 8, 8, 3, 2, 1, 1), (6, 12, 1, 3, 1, 1, 1)])
def test_conv_adjoint_equals_conv2d_input(ci, co, groups, k, stride, pad, dil):
    torch.manual_seed(0)
    w = torch.randn(co, ci // groups, k, k, dtype=torch.float64)
    x = torch.randn(2, ci, 9, 9, dtype=torch.float64)
    u = torch.randn_like(F.conv2d(x, w, None, stride, pad, dil, groups))
    adj = ConvAdjoint(w, x.shape, [stride] * 2, [pad] * 2, [dil] * 2, groups)
    want = torch.nn.grad.conv2d_input(x.shape, w, u, [stride] * 2, [pad] * 2, [dil] * 2, groups)
    assert _rel(adj(u), want) < 1e-13


@pytest.mark.parametrize("stride,damp", [(1, 0.3), (2, 0.3), (1, 0.05)])
def test_per_channel_cgls_matches_dense(stride, damp):
    """A depthwise conv solved with one CG per channel gives the dense damped pseudo-inverse."""
    torch.manual_seed(2)
    node = rebuild_node(helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3],
                                         pads=[1, 1, 1, 1], strides=[stride] * 2, group=5), 0, 17)
    w = torch.randn(5, 1, 3, 3, dtype=torch.float64) * torch.linspace(0.2, 3, 5,
                                                                       dtype=torch.float64)[:, None, None, None]
    x0 = torch.randn(1, 5, 8, 8, dtype=torch.float64)
    y0 = node.run([x0, w])[0]
    target = y0 + torch.randn_like(y0)
    J = ConvMap(node, x0, w, y0)
    assert J.block_dims == (2, 3)
    opts = SolverOptions(damp=damp, tol=1e-10, max_iter=5000)
    x_hat, rec = solve_affine(lambda x: node.run([x, w])[0], x0, target, opts, J=J)
    assert rec.converged and rec.convergence <= 1e-10
    # plain CGLS (one CG for all channels) on the same problem
    plain, _, conv, _ = cgls(J, target - y0, damp * rec.sigma, 1e-10, 5000, None)
    assert conv <= 1e-10 and _rel(x_hat - x0, plain) < 1e-8
    # the dense reference drops singular values below s_max * n * eps(float32): ~1e-5 apart
    dx = dense_solve(J, target - y0, damp, 1 << 30, sigma=rec.sigma)
    assert _rel(x_hat - x0, dx) < 1e-4


def test_fast_flow_equals_reference(small_models, small_image):
    """The whole flow of the small residual and gated nets: fast path against the reference path
    (torch.func on whole segments, one CG per conv), equal to within the solver tolerance."""
    for name in ("residual", "gated"):
        path = small_models[name][1]
        flows = {}
        for mode in ("reference", "fast"):
            flows[mode] = nf.Analyzer(path, damp=0.3, tol=1e-6, reference_solver=mode == "reference") \
                .analyze(small_image, keep_tensors=True)
        ref, fast = flows["reference"], flows["fast"]
        assert fast.solver_summary()["all_converged"]
        for layer in ref.layers:
            t = layer.tensor
            a = ref.tensors.A[t]
            d_ref, d_fast = ref.tensors.BPFM[t] - a, fast.tensors.BPFM[t] - a
            if float(d_ref.norm()) > 0:
                assert _rel(d_fast, d_ref) < 1e-4, (name, t)
            np.testing.assert_allclose(fast.maps[t], ref.maps[t], rtol=1e-4,
                                       atol=1e-5 * max(1e-12, float(np.abs(ref.maps[t]).max())))
