"""METHOD.md §8 properties 2, 4, 5 for every inverse rule, on generated single-node graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from naflow_onnx.rebuild import rebuild_node
from naflow_onnx.rules import RULES, RuleContext
from naflow_onnx.rules.solver import LinearMap, SolverOptions, dense_solve, solve_affine

torch.manual_seed(0)


def make(op, inputs, outputs=("y",), opset=17, **attrs):
    return rebuild_node(helper.make_node(op, list(inputs), list(outputs), **attrs), 0, opset)


def invert(node, env, y, damp=0.0, data=("x",), gate=None, known=None, conv_inverse="lsq"):
    env = dict(env)
    env[node.outputs[0]] = node.run([env.get(t) for t in node.inputs])[0]
    ctx = RuleContext(node=node, env=env, data_inputs=list(data), bpfm_out={node.outputs[0]: y},
                      opts=SolverOptions(damp=damp, tol=1e-6, max_iter=5000,
                                         conv_inverse=conv_inverse),
                      gate=gate, known=known or {})
    cands, rec = RULES[node.op_type].invert(ctx)
    return cands, rec


def fwd(node, env, **override):
    vals = {**env, **override}
    return node.run([vals.get(t) for t in node.inputs])[0]


def close(a, b, tol=1e-4):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-12)) < tol


# --- injective ops: inverse(forward(x)) == x -------------------------------------------------

def test_conv_injective_round_trip():
    node = make("Conv", ["x", "w", "b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    env = {"x": torch.randn(1, 3, 6, 6), "w": torch.randn(6, 3, 3, 3), "b": torch.randn(6)}
    x_true = torch.randn(1, 3, 6, 6)
    cands, rec = invert(node, env, fwd(node, env, x=x_true))
    assert close(cands["x"], x_true, 1e-3)
    assert rec.kind == "cgls" and rec.convergence < 1e-6


def test_pointwise_conv_closed_form_round_trip():
    node = make("Conv", ["x", "w"], kernel_shape=[1, 1])
    env = {"x": torch.randn(1, 4, 5, 5), "w": torch.randn(7, 4, 1, 1)}
    x_true = torch.randn(1, 4, 5, 5)
    cands, rec = invert(node, env, fwd(node, env, x=x_true))
    assert rec.kind == "closed-form"
    assert close(cands["x"], x_true, 1e-5)


def test_batchnorm_round_trip_and_zero_scale_abandoned():
    node = make("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-5)
    env = {"x": torch.randn(1, 3, 4, 4), "s": torch.tensor([1.5, 0.0, -0.7]),
           "b": torch.randn(3), "m": torch.randn(3), "v": torch.rand(3) + 0.5}
    x_true = torch.randn(1, 3, 4, 4)
    cands, _ = invert(node, env, fwd(node, env, x=x_true))
    assert close(cands["x"][:, [0, 2]], x_true[:, [0, 2]], 1e-5)
    assert torch.all(cands["x"][:, 1] == 0)


@pytest.mark.parametrize("op,extra", [("LeakyRelu", {}), ("PRelu", {"slope": torch.tensor([0.1, 0.3])}),
                                      ("Sigmoid", {}), ("Tanh", {})])
def test_injective_activations_round_trip(op, extra):
    inputs = ["x", "slope"] if op == "PRelu" else ["x"]
    node = make(op, inputs, **({"alpha": 0.2} if op == "LeakyRelu" else {}))
    env = {"x": torch.randn(1, 2, 4, 4), **extra}
    x_true = torch.randn(1, 2, 4, 4)
    cands, _ = invert(node, env, fwd(node, env, x=x_true))
    assert close(cands["x"], x_true, 1e-4)


def test_pad_round_trip():
    node = make("Pad", ["x", "p"], mode="constant")
    env = {"x": torch.randn(1, 2, 4, 4), "p": torch.tensor([0, 0, 1, 2, 0, 0, 2, 1])}
    x_true = torch.randn(1, 2, 4, 4)
    cands, _ = invert(node, env, fwd(node, env, x=x_true))
    assert close(cands["x"], x_true, 1e-5)


def test_nearest_resize_round_trip():
    node = make("Resize", ["x", "", "s"], mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")
    env = {"x": torch.randn(1, 2, 3, 3), "s": torch.tensor([1.0, 1.0, 2.0, 2.0])}
    x_true = torch.randn(1, 2, 3, 3)
    cands, _ = invert(node, env, fwd(node, env, x=x_true))
    assert close(cands["x"], x_true, 1e-4)


@pytest.mark.parametrize("op,attrs,extra", [
    ("Reshape", {}, {"shape": torch.tensor([1, 4, 8])}),
    ("Transpose", {"perm": [0, 2, 3, 1]}, {}),
    ("Flatten", {"axis": 1}, {}),
])
def test_structural_round_trip(op, attrs, extra):
    node = make(op, ["x"] + list(extra), **attrs)
    env = {"x": torch.randn(1, 2, 4, 4), **extra}
    x_true = torch.randn(1, 2, 4, 4)
    cands, _ = invert(node, env, fwd(node, env, x=x_true))
    assert torch.equal(cands["x"], x_true)


def test_concat_split_round_trip():
    node = make("Concat", ["x", "z"], axis=1)
    env = {"x": torch.randn(1, 2, 3, 3), "z": torch.randn(1, 3, 3, 3)}
    xt, zt = torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3)
    cands, _ = invert(node, env, fwd(node, env, x=xt, z=zt), data=("x", "z"))
    assert torch.equal(cands["x"], xt) and torch.equal(cands["z"], zt)


def test_add_constant_and_residual_join():
    node = make("Add", ["x", "c"])
    env = {"x": torch.randn(1, 2, 3, 3), "c": torch.randn(1, 2, 3, 3)}
    xt = torch.randn(1, 2, 3, 3)
    cands, _ = invert(node, env, fwd(node, env, x=xt))
    assert close(cands["x"], xt, 1e-6)
    join = make("Add", ["a", "b"])
    env = {"a": torch.randn(1, 2, 3, 3), "b": torch.randn(1, 2, 3, 3)}
    at, bt = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    cands, _ = invert(join, env, at + bt, data=("a", "b"), known={"b": bt})
    assert close(cands["a"], at, 1e-6)


# --- non-injective ops: forward(inverse(y)) == y for y in the range -------------------------------

def test_strided_conv_forward_of_inverse():
    node = make("Conv", ["x", "w"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    env = {"x": torch.randn(1, 4, 8, 8), "w": torch.randn(6, 4, 3, 3)}
    y = fwd(node, env, x=torch.randn(1, 4, 8, 8))            # q = 96 < p = 256
    cands, rec = invert(node, env, y)
    assert close(fwd(node, env, x=cands["x"]), y, 1e-4)
    assert rec.misfit < 1e-3


def test_relu_and_clip_forward_of_inverse():
    for op, node in (("Relu", make("Relu", ["x"])), ("Clip", make("Clip", ["x", "lo", "hi"]))):
        env = {"x": torch.randn(1, 2, 4, 4), "lo": torch.tensor(0.0), "hi": torch.tensor(6.0)}
        y = fwd(node, env, x=torch.randn(1, 2, 4, 4) * 3)
        cands, _ = invert(node, env, y)
        assert torch.equal(fwd(node, env, x=cands["x"]), y), op


def test_maxpool_forward_of_inverse_and_losers_zero():
    node = make("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])
    env = {"x": torch.randn(1, 2, 6, 6)}
    y = torch.rand(1, 2, 3, 3) + 0.1
    cands, _ = invert(node, env, y)
    x_hat = cands["x"]
    assert torch.equal(fwd(node, env, x=x_hat), y)
    assert int((x_hat != 0).sum()) == y.numel()               # only the selected positions


@pytest.mark.parametrize("op,attrs", [("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
                                      ("GlobalAveragePool", {})])
def test_average_pools_forward_of_inverse(op, attrs):
    node = make(op, ["x"], **attrs)
    env = {"x": torch.randn(1, 2, 4, 4)}
    y = fwd(node, env, x=torch.randn(1, 2, 4, 4))
    cands, _ = invert(node, env, y)
    assert close(fwd(node, env, x=cands["x"]), y, 1e-4)


def test_gated_mul_forward_of_inverse():
    node = make("Mul", ["x", "g"])
    env = {"x": torch.randn(1, 3, 4, 4), "g": torch.sigmoid(torch.randn(1, 3, 1, 1))}
    y = torch.randn(1, 3, 4, 4)
    cands, _ = invert(node, env, y, gate="g")
    assert close(fwd(node, env, x=cands["x"]), y, 1e-5)


def test_gemm_forward_of_inverse():
    node = make("Gemm", ["x", "w", "b"], transB=1)
    env = {"x": torch.randn(1, 8), "w": torch.randn(3, 8), "b": torch.randn(3)}
    y = fwd(node, env, x=torch.randn(1, 8))
    cands, _ = invert(node, env, y)
    assert close(fwd(node, env, x=cands["x"]), y, 1e-4)


def test_conv_transpose_round_trip():
    node = make("ConvTranspose", ["x", "w"], kernel_shape=[2, 2], strides=[2, 2])
    env = {"x": torch.randn(1, 3, 3, 3), "w": torch.randn(3, 2, 2, 2)}
    xt = torch.randn(1, 3, 3, 3)                                # q = 72 >= p = 27: injective
    cands, _ = invert(node, env, fwd(node, env, x=xt))
    assert close(cands["x"], xt, 1e-3)


# --- §8.4 matrix-free vs dense, §8.5 paper mode ------------------------------------------------

@pytest.mark.parametrize("damp", [0.0, 0.1, 1.0])
def test_matrix_free_matches_dense_pinv(damp):
    torch.manual_seed(1)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)           # float64: a tight tolerance is reachable
    f = lambda x: torch.nn.functional.conv2d(x, w, stride=2, padding=1)  # noqa: E731
    x0 = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    target = f(x0) + torch.randn(1, 5, 4, 4, dtype=torch.float64)  # inconsistent right side
    opts = SolverOptions(damp=damp, tol=1e-8, max_iter=5000, power_iter=100)
    x_hat, rec = solve_affine(f, x0, target, opts)
    J = LinearMap(f, x0)
    # the same damping lambda = t * sigma on both sides (sigma: the solver's power-iteration estimate)
    dx = dense_solve(J, target - f(x0), damp, 1 << 30, sigma=rec.sigma)
    assert rec.converged and rec.iterations < 5000
    assert close(x_hat - x0, dx, 1e-6), rec


def test_paper_mode_matches_eq8_and_default_when_consistent():
    w = torch.randn(4, 2, 3, 3)
    b = torch.randn(4)
    f = lambda x: torch.nn.functional.conv2d(x, w, b, padding=1)  # noqa: E731
    x0 = torch.randn(1, 2, 4, 4)
    x_true = torch.randn(1, 2, 4, 4)
    y = f(x_true)                                                # consistent: q = 64 >= p = 32
    x_paper, rec = solve_affine(f, x0, y, SolverOptions(damp=0.0, conv_inverse="paper"))
    # Eq. 8 densely: the first p rows of W, applied to y - b
    jac = torch.autograd.functional.jacobian(f, x0).reshape(64, 32).double()
    p = 32
    eq8 = torch.linalg.solve(jac[:p], (y.reshape(-1) - f(torch.zeros_like(x0)).reshape(-1))[:p].double())
    assert close(x_paper.reshape(-1), eq8, 1e-4)
    x_lsq, _ = solve_affine(f, x0, y, SolverOptions(damp=0.0, tol=1e-6, max_iter=5000))
    assert close(x_paper, x_lsq, 1e-3)
    assert close(x_paper, x_true, 1e-3)


def test_paper_mode_refuses_large_jacobian():
    w = torch.randn(64, 64, 3, 3)
    f = lambda x: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    x0 = torch.randn(1, 64, 64, 64)
    from naflow_onnx.errors import NAFlowError
    with pytest.raises(NAFlowError, match="dense Jacobian"):
        solve_affine(f, x0, f(x0) + 1, SolverOptions(damp=0.0, conv_inverse="paper",
                                                      dense_limit_bytes=1 << 20))


def test_every_rule_op_has_a_torch_rebuild():
    from naflow_onnx.rebuild import OPS
    assert set(RULES) <= set(OPS)
    assert np.all([callable(RULES[k].invert) for k in RULES])
