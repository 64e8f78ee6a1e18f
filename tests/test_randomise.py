"""naflow_onnx.randomise: the check's sanity gate and evaluate's cascade redraw the same weights,
including those the check used to miss (a Constant node's weight, MatMul's first input)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from naflow_onnx.check import randomise_weights
from naflow_onnx.randomise import constant_value, randomise_onnx, weight_bearing_nodes


def _graph():
    """x[4, 3] -> MatMul(W1 (a Constant node), x) -> Gemm(initializer W2, bias) -> y."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((5, 4)).astype(np.float32)
    w2 = rng.standard_normal((2, 3)).astype(np.float32)
    b2 = rng.standard_normal(2).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w1, "W1v")),
             helper.make_node("MatMul", ["W1", "x"], ["h"], name="left"),
             helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], name="head", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 3])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, 2])],
                          [numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b2, "B2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, w1, w2, b2


def _inputs(model, name):
    node = next(n for n in model.graph.node if n.name == name)
    return [constant_value(model, t) for t in node.input]


def test_weights_in_constant_nodes_and_matmul_first_input():
    model, w1, w2, b2 = _graph()
    assert [(name, slots) for _, name, slots in weight_bearing_nodes(model)] == [("head", [1, 2]),
                                                                                ("left", [0])]
    tampered, names = randomise_weights(model, count=2, seed=4)
    assert names == ["head", "left"]
    left, head = _inputs(tampered, "left"), _inputs(tampered, "head")
    assert left[0].shape == w1.shape and not np.allclose(left[0], w1)      # the Constant weight
    assert not np.allclose(head[1], w2)
    np.testing.assert_array_equal(head[2], b2)                           # the gate keeps biases
    # the same draw as evaluate's cascade (which also redraws biases)
    cascade, _ = randomise_onnx(model, 2, seed=4)
    np.testing.assert_array_equal(_inputs(cascade, "left")[0], left[0])
    np.testing.assert_array_equal(_inputs(cascade, "head")[1], head[1])
    assert not np.allclose(_inputs(cascade, "head")[2], b2)
    # skip: the top node kept, the next one redrawn
    skipped, names = randomise_weights(model, count=1, skip=1, seed=4)
    assert names == ["left"] and np.array_equal(_inputs(skipped, "head")[1], w2)
    onnx.checker.check_model(tampered)
