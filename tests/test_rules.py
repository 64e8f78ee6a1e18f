"""METHOD.md §8 properties 2, 4, 5 for every inverse rule, generated from the op registry: each
record's samples (``naflow_onnx/ops/catalog.py``) are single-node graphs on which its rule must
round-trip; plus the registry's own invariants and README's "Supported ops" table."""
from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
import torch
from onnx import helper

from naflow_onnx import ops
from naflow_onnx.ops import LAYOUT, Registry
from naflow_onnx.rebuild import rebuild_node
from naflow_onnx.rules import RuleContext
from naflow_onnx.rules.elementwise import GATE_FLOOR
from naflow_onnx.rules.solver import LinearMap, SolverOptions, dense_solve, solve_affine

torch.manual_seed(0)
README = Path(__file__).resolve().parents[1] / "README.md"


def make(op, inputs, outputs=("y",), opset=17, **attrs):
    return rebuild_node(helper.make_node(op, list(inputs), list(outputs), **attrs), 0, opset)


def run(node, values: dict) -> dict:
    """The node's outputs by name, inputs read from ``values``."""
    return dict(zip(node.outputs, node.run([values.get(t) if t else None for t in node.inputs])))


def invert(node, env, y: dict, data, gate=None, known=None):
    env = {**env, **run(node, env)}
    ctx = RuleContext(node=node, env=env, data_inputs=list(data), bpfm_out=y,
                      opts=SolverOptions(damp=0.0, tol=1e-6, max_iter=5000),
                      gate=gate, known=known or {})
    return ops.rule_for(node).invert(ctx)


def close(a, b, tol=1e-4):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-12)) < tol


# --- §8.2 round trips, one test per registry sample --------------------------------------------

SAMPLES = [pytest.param(rec, s, id=f"{rec.op_type}-{s.label or k}")
           for rec in ops.REGISTRY.records() if rec.samples is not None
           for k, s in enumerate(rec.samples())]
RULE_SAMPLES = [p for p in SAMPLES if p.values[0].rule is not None]


@pytest.mark.parametrize("rec,s", RULE_SAMPLES)
def test_rule_round_trip(rec, s):
    g = torch.Generator().manual_seed(0)
    consts = s.consts(g) if s.consts else {}
    inputs = s.inputs or tuple(s.shapes) + tuple(consts)
    node = rebuild_node(helper.make_node(rec.op_type, list(inputs), list(s.outputs), **s.attrs),
                        0, s.opset)
    draw = (lambda shape: torch.randn(shape, generator=g).abs() + 0.1) if s.check == "selection" \
        else (lambda shape: s.scale * torch.randn(shape, generator=g))
    A = {k: draw(shape) for k, shape in s.shapes.items()}          # the forward point
    truth = {k: draw(shape) for k, shape in s.shapes.items()}      # the x the target comes from
    env = {**consts, **A}
    if s.check in ("frozen", "point"):
        y = {o: torch.randn(v.shape, generator=g) for o, v in run(node, env).items()}
    else:
        y = run(node, {**env, **(A if s.check == "selection" else truth)})
    known = {k: truth[k] for k in s.known}
    cands, record = invert(node, env, y, data=list(s.shapes), gate=s.gate, known=known)
    unknown = [k for k in s.shapes if k not in s.known]
    assert sorted(cands) == sorted(unknown)
    if s.kind is not None:
        assert record.kind == s.kind
    if s.check == "frozen":
        (x,), (o,) = unknown, s.outputs
        gate = torch.where(A[x] != 0, run(node, env)[o] / A[x], torch.zeros_like(A[x]))
        # open: at least GATE_FLOOR of the largest gate (a closed gate abandons, docs/method.md)
        live = gate.abs() >= GATE_FLOOR * float(gate.abs().max())
        assert live.any() and not live.all()   # every sample has closed gates: abandonment checked
        assert close((gate * cands[x])[live], y[o][live], s.tol)
        assert torch.all(cands[x][~live] == 0)
        return
    if s.check == "point":
        # statistics frozen at the forward point A (a normalisation layer): the rule inverts the
        # affine map y = J (x - A) + forward(A), J the frozen diagonal the linearisation uses
        (x,), (o,) = unknown, s.outputs
        y0 = run(node, env)[o]
        back, _ = invert(node, env, {o: y0}, data=[x])
        assert close(back[x], A[x], s.tol)                          # inverse(forward(A)) == A
        diag = ops.rule_for(node).frozen_diagonal(node, env)
        assert close(diag * (cands[x] - A[x]), y[o] - y0, s.tol)   # J·(inverse(y) - A) == y - y0
        return
    if s.check == "injective":
        for k in unknown:
            assert close(cands[k], truth[k], s.tol), k
    again = run(node, {**env, **known, **cands})                  # forward(inverse(y)) == y
    for o in s.outputs:
        assert close(again[o], y[o], s.tol), o
    if s.check == "selection":
        (x,) = unknown
        assert 0 < int((cands[x] != 0).sum()) <= sum(v.numel() for v in y.values())


# --- the registry itself --------------------------------------------------------------------------

def test_every_layout_keeping_op_has_a_rule_and_every_rule_samples():
    """A layout-keeping op can lie between feature layers, so it needs a rule; a rule no sample
    exercises is untested."""
    recs = list(ops.REGISTRY.records())
    assert len(recs) >= 70
    assert not [r.op_type for r in recs if r.role == LAYOUT and r.rule is None]
    assert not [r.op_type for r in recs if not r.samples]          # each op's rebuild is tested
    assert not [r.op_type for r in recs if r.join and not r.role == LAYOUT]
    # the data-path ops of the models we ship: each has a rule
    for op in ("Conv", "BatchNormalization", "Relu", "Clip", "MaxPool", "Add", "Mul",
               "GlobalAveragePool", "Flatten", "Gemm", "HardSwish", "Concat"):
        assert ops.rule_for(make(op, ["x"])) is not None, op


def test_queries_answer_from_the_record():
    conv = onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"])
    assert ops.weight_inputs(conv) == (1, 2) and ops.makes_features(conv)
    assert ops.weight_inputs("MatMul") == (1, 0)
    assert ops.weight_inputs("Relu") == () and ops.keeps_layout("Relu")
    assert not ops.keeps_layout("Reshape") and ops.is_shape_only("Reshape")
    assert ops.is_probability("Softmax") and ops.is_gate_source("HardSigmoid")
    assert not ops.keeps_layout("NoSuchOp") and ops.record("NoSuchOp") is None
    custom = onnx.helper.make_node("Relu", ["x"], ["y"], domain="com.example")
    assert ops.record(custom) is None and not ops.keeps_layout(custom)
    from naflow_onnx.errors import UnsupportedOpError
    with pytest.raises(UnsupportedOpError, match=r"no inverse rule for op Softmax at node 's'"):
        ops.rule_for(rebuild_node(helper.make_node("Softmax", ["x"], ["y"], name="s"), 0, 17))


def test_registering_twice_is_an_error_and_opset_ranges_select_the_record():
    reg = Registry()
    old = reg.register("Foo", lambda n, i: i[0], until=10)
    new = reg.register("Foo", lambda n, i: -i[0], since=11)
    assert reg.find("Foo", 9) is old and reg.find("Foo", 11) is new and reg.find("Foo") is new
    assert reg.find("Foo", 11, domain="ai.onnx") is new and reg.find("Foo", 11, "x.y") is None
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("Foo", lambda n, i: i[0], since=5, until=12)
    reg.register("Foo", lambda n, i: i[0], domain="x.y")           # another domain: allowed
    with pytest.raises(ValueError, match="registered twice"):
        ops.register("Conv", lambda n, i: i[0])                     # the real registry too
    assert ops.record("Conv").op_type == "Conv"


def test_readme_supported_ops_table_is_the_registry_rendering():
    text = README.read_text()
    found = re.search(re.escape(ops.TABLE_BEGIN) + ".*?" + re.escape(ops.TABLE_END), text, re.S)
    assert found, "README lacks the generated Supported ops table"
    assert found.group(0) == ops.supported_ops_table()
    for rec in ops.REGISTRY.records():
        assert f" {rec.op_type}" in found.group(0), rec.op_type


# --- rule properties beyond the round trip --------------------------------------------------------

def test_batchnorm_zero_scale_abandoned():
    node = make("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-5)
    env = {"x": torch.randn(1, 3, 4, 4), "s": torch.tensor([1.5, 0.0, -0.7]),
           "b": torch.randn(3), "m": torch.randn(3), "v": torch.rand(3) + 0.5}
    x_true = torch.randn(1, 3, 4, 4)
    cands, _ = invert(node, env, run(node, {**env, "x": x_true}), data=["x"])
    assert close(cands["x"][:, [0, 2]], x_true[:, [0, 2]], 1e-5)
    assert torch.all(cands["x"][:, 1] == 0)


def test_maxpool_losers_zero():
    node = make("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])
    env = {"x": torch.randn(1, 2, 6, 6)}
    y = torch.rand(1, 2, 3, 3) + 0.1
    cands, _ = invert(node, env, {"y": y}, data=["x"])
    x_hat = cands["x"]
    assert torch.equal(run(node, {"x": x_hat})["y"], y)
    assert int((x_hat != 0).sum()) == y.numel()               # only the selected positions


@pytest.mark.parametrize("op", ["Max", "Sum", "Div"])
def test_refusals_name_the_node(op):
    """Two unknown operands of Max, and a division by a data tensor, have no rule: refused."""
    from naflow_onnx.errors import UnsupportedOpError
    node = make(op, ["a", "b"])
    env = {"a": torch.randn(1, 2, 3, 3), "b": torch.rand(1, 2, 3, 3) + 1}
    y = run(node, env)
    with pytest.raises(UnsupportedOpError, match=rf"node '{op}_0' \({op}, opset 17\)"):
        invert(node, env, y, data=["a", "b"])


# --- end to end: ops that got a rule with the registry ------------------------------------------

def _analysed(act: str, tmp_path):
    """Three convs, each followed by ``act``, a GAP + linear head; the same weights for every act."""
    import numpy as np
    from torch import nn

    import naflow_onnx as nf
    from exporters.torch_export import export

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1),
                                        nn.Conv2d(8, 8, 3, 2, 1)])
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            for conv in self.convs:
                x = conv(x)
                x = {"relu": torch.relu, "softplus": torch.nn.functional.softplus,
                     "max": lambda t: torch.maximum(t, torch.zeros(()))}[act](x)
            return self.fc(x.mean((2, 3)))

    path = tmp_path / f"{act}.onnx"
    export(Net().eval(), path, (1, 3, 16, 16), preprocess="none")
    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    flow = nf.Analyzer(path, tol=1e-6, max_iter=5000).analyze(image, target=0)
    return flow, [n.op_type for n in onnx.load(path).graph.node]


def test_max_with_zero_maps_like_relu_and_softplus_maps_every_layer(tmp_path):
    """Max(x, 0) is a ReLU: the same maps as the ReLU net (before the registry, Max was a
    layout-keeping op with no rule and the net was refused). Softplus nets map every layer."""
    relu, _ = _analysed("relu", tmp_path)
    as_max, op_types = _analysed("max", tmp_path)
    assert op_types.count("Max") == 3 and "Relu" not in op_types
    assert len(as_max.layers) == len(relu.layers) == 6
    for a, b in zip(as_max.maps.values(), relu.maps.values()):
        assert float(abs(a - b).max()) <= 1e-5 * max(float(abs(b).max()), 1e-12)
    soft, op_types = _analysed("softplus", tmp_path)
    assert op_types.count("Softplus") == 3
    assert len(soft.layers) == 6 and soft.solver_summary()["all_converged"]


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


@pytest.mark.parametrize("rec,s", SAMPLES)
def test_sample_rebuild_matches_onnxruntime(rec, s):
    """The record's torch rebuild against onnxruntime on the same sample node (an independent
    implementation of the op)."""
    import onnxruntime as ort
    from onnx import numpy_helper

    g = torch.Generator().manual_seed(0)
    consts = s.consts(g) if s.consts else {}
    inputs = s.inputs or tuple(s.shapes) + tuple(consts)
    data = {k: s.scale * torch.randn(shape, generator=g) for k, shape in s.shapes.items()}
    onnx_node = helper.make_node(rec.op_type, list(inputs), list(s.outputs), **s.attrs)
    got = run(rebuild_node(onnx_node, 0, s.opset), {**consts, **data})
    types = {torch.float32: onnx.TensorProto.FLOAT, torch.int64: onnx.TensorProto.INT64,
             torch.bool: onnx.TensorProto.BOOL}
    graph = helper.make_graph(
        [onnx_node], "sample",
        [helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, list(v.shape)) for k, v in data.items()],
        [helper.make_tensor_value_info(o, types[got[o].dtype], None) for o in s.outputs],
        [numpy_helper.from_array(v.numpy(), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", s.opset)])
    model.ir_version = min(model.ir_version, 8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {k: v.numpy() for k, v in data.items()})
    for o, want in zip(s.outputs, expected):
        assert got[o].shape == want.shape, o
        assert close(got[o], torch.from_numpy(want), 1e-5), o
