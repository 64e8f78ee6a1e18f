"""Fan-out and fan-in inside segments (METHOD.md §5): a DenseNet-style block (a tensor read by
several Concats), an Inception-style block (one tensor into four branches, and a tensor into a
1x3 and a 3x1 conv) and a fusion Add of two branches. The matrix-free stacked / joint solves
must equal the damped pseudo-inverse of the explicit Jacobian (§8.4), built here with
torch.autograd on the rebuilt nodes, independently of the solver's linear maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import naflow_onnx as nf
from exporters.torch_export import export
from naflow_onnx.errors import UnsupportedOpError
from naflow_onnx.evaluate import nets

SIZE = 16


def _cbr(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2), nn.ReLU())


class TinyHead(nn.Module):
    """stem -> body -> conv -> GAP -> linear; ``body`` maps ``stem`` channels to ``cout``."""

    def __init__(self, body: nn.Module, cout: int, stem: int = 6):
        super().__init__()
        self.stem, self.body = _cbr(3, stem), body
        self.last = _cbr(cout, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.last(self.body(self.stem(x))).mean((2, 3)))


class FusionAdd(nn.Module):
    """Two non-shortcut branches (both end in a ReLU) summed: a fan-in with k = 2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(_cbr(6, 6), _cbr(6, 6))
        self.b = _cbr(6, 6, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class Product(nn.Module):
    """Two ReLU branches multiplied (not a sigmoid gate): a fan-in Mul, J_a = diag(b), J_b = diag(a)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(6, 6), _cbr(6, 6, 1)

    def forward(self, x):
        return self.a(x) * self.b(x)


class Softplussed(nn.Module):
    """A tensor read by a conv and by Abs (an op with no inverse rule) inside a segment
    (the identity shortcut keeps it from being the segment's input)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(6, 6), nn.Conv2d(6, 6, 3, 1, 1)

    def forward(self, x):
        r = self.a(x)
        return self.b(r) + torch.abs(r - 0.5) + x


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(3)
    if name == "dense":
        body, cout = nets.DenseBlock(6, 4, layers=3), 18
    elif name == "inception":
        body = nets.InceptionBlock(6, 4, (4, 4), (4, 4), 4)
        cout = body.cout
    elif name == "fusion":
        body, cout = FusionAdd(), 6
    elif name == "product":
        body, cout = Product(), 6
    else:
        body, cout = Softplussed(), 6
    model = TinyHead(body, cout)
    for m in model.modules():   # non-trivial BN (folded on export)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def branch_flows(workdir):
    image = np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    out = {}
    for name in ("dense", "inception", "fusion", "product"):
        path = workdir / f"branch_{name}.onnx"
        export(_tiny(name), path, (1, 3, SIZE, SIZE), preprocess="none")
        an = nf.Analyzer(str(path))
        out[name] = (an, an.analyze(image, keep_tensors=True))
    return out


def _explicit_solution(an, flow, record, t: str | None):
    """The damped pseudo-inverse solution from explicit Jacobians (float64): for a fan-out the
    readers' Jacobians in ``t`` stacked, for a fan-in the node's Jacobians in its inputs side
    by side. Returns {tensor: x_hat before abandonment}."""
    env, bpfm = flow.tensors.env, flow.tensors.BPFM
    by_name = {n.name: n for n in an.graph.nodes}
    d64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in env.items()}

    def fn(node, wrt, out):
        def f(x):
            args = [x if u == wrt else (d64[u] if u else None) for u in node.inputs]
            return node.run(args)[node.outputs.index(out)]
        return f

    def jac(node, wrt, out):
        J = torch.autograd.functional.jacobian(fn(node, wrt, out), d64[wrt], vectorize=True)
        return J.reshape(d64[out].numel(), d64[wrt].numel())

    if record["rule"].startswith("fan-out"):
        blocks, rhs = [], []
        for node in (by_name[n] for n in record["nodes"]):
            for o in node.outputs:
                if o in bpfm:
                    blocks.append(jac(node, t, o))
                    rhs.append(bpfm[o].double().reshape(-1) - d64[o].reshape(-1))
        M, delta, ins = torch.cat(blocks, 0), torch.cat(rhs), [t]
    else:
        node = by_name[record["node"]]
        out = next(o for o in node.outputs if o in bpfm)
        ins = [u for u in dict.fromkeys(node.inputs) if u in d64 and u in an.plan_for(env).data]
        M = torch.cat([jac(node, u, out) for u in ins], 1)
        delta = bpfm[out].double().reshape(-1) - d64[out].reshape(-1)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    lam = record["damp"] * record["sigma"] if record["kind"] == "cgls" else 0.0
    keep = S > S[0] * max(M.shape) * 1e-12
    inv = torch.where(keep, S / (S * S + lam * lam), torch.zeros_like(S))
    dx = Vh.T @ (inv * (U.T @ delta))
    sizes = [d64[u].numel() for u in ins]
    return {u: d64[u] + p.reshape(d64[u].shape) for u, p in zip(ins, torch.split(dx, sizes))}


@pytest.mark.parametrize("name,rule,count", [("dense", "fan-out (stacked, m=", 2),
                                             ("inception", "fan-out (stacked, m=2)", 2),
                                             ("fusion", "fan-in (joint, k=2)", 1),
                                             ("product", "fan-in (joint, k=2)", 1)])
def test_stacked_and_joint_solves_equal_dense_pseudo_inverse(branch_flows, name, rule, count):
    an, flow = branch_flows[name]
    bpfm, lam = flow.tensors.BPFM, flow.tensors.Lambda
    recs = {layer.tensor: layer.solver for layer in flow.layers
            if layer.solver and layer.solver["rule"].startswith(rule)}
    assert len(recs) >= count, {layer.tensor: (layer.solver or {}).get("rule") for layer in flow.layers}
    checked, solved_nodes = 0, set()
    for t, rec in recs.items():
        assert rec["converged"] is True
        if rule.startswith("fan-in"):
            if rec["node"] in solved_nodes:   # one joint solve gave all its inputs
                continue
            solved_nodes.add(rec["node"])
            x = _explicit_solution(an, flow, rec, None)
        else:
            x = _explicit_solution(an, flow, rec, t)
        for u, x_hat in x.items():
            if u not in recs and rule.startswith("fan-out"):
                continue
            want = torch.where(lam[u] != 0, x_hat, torch.zeros_like(x_hat))
            got = bpfm[u].double()
            err = float((got - want).norm() / want.norm())
            assert err < 2e-4, (name, u, err)
            checked += 1
    assert checked >= count


def test_copy_fan_out_is_the_average_of_slices(branch_flows):
    """Dense block: a layer output read only by Concats gets the undamped average of its slices."""
    an, flow = branch_flows["dense"]
    exact = [layer for layer in flow.layers
             if layer.solver and layer.solver["rule"].startswith("fan-out") and layer.solver["kind"] == "exact"]
    assert len(exact) >= 2
    env, bpfm, lam = flow.tensors.env, flow.tensors.BPFM, flow.tensors.Lambda
    by_name = {n.name: n for n in an.graph.nodes}
    for layer in exact:
        t = layer.tensor
        slices = []
        for node in (by_name[n] for n in layer.solver["nodes"]):
            assert node.op_type == "Concat"
            start = 0
            for u in node.inputs:
                if u == t:
                    slices.append(bpfm[node.outputs[0]][:, start:start + env[t].shape[1]])
                start += env[u].shape[1]
        mean = torch.stack(slices).mean(0)
        want = torch.where(lam[t] != 0, mean, torch.zeros_like(mean))
        assert torch.allclose(bpfm[t], want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(slices[0], slices[-1])   # the slices really differ


@pytest.mark.parametrize("name", ["dense", "inception", "fusion", "product"])
def test_branch_nets_abandon_parity_and_converge(branch_flows, name):
    an, flow = branch_flows[name]
    bpfm, lam = flow.tensors.BPFM, flow.tensors.Lambda
    assert flow.parity["max_relative_error"] <= 1e-4
    mapped = [layer.tensor for layer in flow.layers]
    convs = [n.outputs[0] for n in an.graph.nodes if n.op_type == "Conv"]
    relus = [n.outputs[0] for n in an.graph.nodes if n.op_type == "Relu"]
    assert set(relus) <= set(mapped) and len(mapped) >= len(convs)
    for t in mapped:
        assert t in bpfm
        assert bool((bpfm[t][lam[t] == 0] == 0).all()), t          # §8.3 abandonment
        assert bool(torch.isfinite(bpfm[t]).all()), t
    for layer in flow.layers:
        if layer.solver and layer.solver.get("kind") == "cgls":
            assert layer.solver["converged"], (layer.tensor, layer.solver)


def test_fan_out_into_an_op_without_rule_is_refused_naming_tensor_and_nodes(workdir):
    path = workdir / "branch_softplus.onnx"
    export(_tiny("softplus"), path, (1, 3, SIZE, SIZE), preprocess="none")
    image = np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(UnsupportedOpError) as err:
        nf.analyze(str(path), image)
    msg = str(err.value)
    # refused up front (before any work), naming the op and its node
    assert "Abs (node '/body/Abs'" in msg and "no inverse rule" in msg


@pytest.mark.parametrize("name", ["dense", "inception", "fusion", "product"])
def test_infinite_damping_is_gradient_times_activation(branch_flows, name):
    """t = inf gives Δ = 0 in every rule, fan-out and fan-in included: NAFlow = gradxact."""
    an, flow = branch_flows[name]
    path = an.graph.path
    image = np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    inf = nf.Analyzer(str(path), damp=float("inf")).analyze(image, compare="gradxact")
    assert set(inf.maps) == set(flow.maps)
    for t in inf.maps:
        assert np.array_equal(inf.maps[t], inf.compare_maps[t]), t
    # and the finite-t maps differ from it somewhere (the rules did something)
    assert any(not np.allclose(flow.maps[t], inf.maps[t]) for t in flow.maps)


def test_sum_of_three_branches_is_a_joint_fan_in(tmp_path):
    """An ONNX Sum of three ReLU branches (k = 3) against the explicit damped pseudo-inverse."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)

    def w(name, cout, cin, k):
        return numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32), name)

    inits = [w("w0", 4, 3, 3), w("wa", 4, 4, 3), w("wb", 4, 4, 1), w("wc", 4, 4, 3), w("w1", 5, 4, 3)]
    conv = dict(pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], **conv), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "wa"], ["ca"], **conv), helper.make_node("Relu", ["ca"], ["a"]),
             helper.make_node("Conv", ["r0", "wb"], ["cb"]), helper.make_node("Relu", ["cb"], ["b"]),
             helper.make_node("Conv", ["r0", "wc"], ["cc"], **conv), helper.make_node("Relu", ["cc"], ["c"]),
             helper.make_node("Sum", ["a", "b", "c"], ["s"]),
             helper.make_node("Conv", ["s", "w1"], ["c1"], **conv), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["y"])]
    graph = helper.make_graph(nodes, "sum3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 1, 1])], inits)
    path = tmp_path / "sum3.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    an = nf.Analyzer(str(path), preprocess="none")
    image = np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    flow = an.analyze(image, keep_tensors=True)
    recs = {layer.tensor: layer.solver for layer in flow.layers}
    assert {recs[t]["rule"] for t in "abc"} == {"fan-in (joint, k=3)"}
    assert recs["a"]["converged"]
    bpfm, lam = flow.tensors.BPFM, flow.tensors.Lambda
    for u, x_hat in _explicit_solution(an, flow, recs["a"], None).items():
        want = torch.where(lam[u] != 0, x_hat, torch.zeros_like(x_hat))
        assert float((bpfm[u].double() - want).norm() / want.norm()) < 2e-4, u


# --------------------------------------------------------------- branchy families (issue 13)
def _cbn(i, o, k=3, s=1, g=1, act=True):
    layers = [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, *([nn.ReLU()] if act else []))


class GhostBlock(nn.Module):
    """GhostNet: each ghost module's primary output is read by a depthwise conv and a Concat."""

    def __init__(self, c):
        super().__init__()
        self.p1, self.c1 = _cbn(c, c, 1), _cbn(c, c, 3, g=c)
        self.p2, self.c2 = _cbn(2 * c, c // 2, 1), _cbn(c // 2, c // 2, 3, g=c // 2)

    def forward(self, x):
        y = self.p1(x)
        y = torch.cat([y, self.c1(y)], 1)
        z = self.p2(y)
        return x + torch.cat([z, self.c2(z)], 1)


class Res2Block(nn.Module):
    """Res2Net: split into 4, each 3x3 reads its chunk plus the previous 3x3's output."""

    def __init__(self, c, scale=4):
        super().__init__()
        self.w = c // scale
        self.c1 = _cbn(c, c, 1)
        self.convs = nn.ModuleList(_cbn(self.w, self.w) for _ in range(scale - 1))
        self.c3 = _cbn(c, c, 1, act=False)

    def forward(self, x):
        parts, out, y = torch.split(self.c1(x), self.w, 1), [], None
        for i, conv in enumerate(self.convs):
            y = conv(parts[i] if i == 0 else y + parts[i])
            out.append(y)
        return F.relu(self.c3(torch.cat(out + [parts[-1]], 1)) + x)


class PreactDenseBlock(nn.Module):
    """DenseNet as timm writes it: BN-ReLU-conv1x1-BN-ReLU-conv3x3 on cat(features) (BN kept)."""

    def __init__(self, c, growth=4, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(
            nn.BatchNorm2d(c + i * growth), nn.ReLU(), nn.Conv2d(c + i * growth, 2 * growth, 1, bias=False),
            nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False))
            for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class CSPBlock(nn.Module):
    """CSPDarknet: a 1x1 conv, one half through a residual pair, the other half kept, concatenated."""

    def __init__(self, c):
        super().__init__()
        self.a, self.t = _cbn(c, c, 1), _cbn(c, c, 1)
        self.b = nn.Sequential(_cbn(c // 2, c // 2), _cbn(c // 2, c // 2))

    def forward(self, x):
        p, q = self.a(x).chunk(2, 1)
        return self.t(torch.cat([p, self.b(q) + q], 1))


class HRFuse(nn.Module):
    """HRNet: a high- and a low-resolution branch fused both ways (upsample + add, stride-2 conv + add)."""

    def __init__(self, c):
        super().__init__()
        self.hi, self.lo = _cbn(c, c), nn.Sequential(_cbn(c, c, 3, 2), _cbn(c, c))
        self.up, self.down = _cbn(c, c, 1, act=False), _cbn(c, c, 3, 2, act=False)

    def forward(self, x):
        h, lo = self.hi(x), self.lo(x)
        h2 = F.relu(h + F.interpolate(self.up(lo), scale_factor=2.0, mode="nearest"))
        l2 = F.relu(lo + self.down(h))
        return h2 + F.interpolate(l2, scale_factor=2.0, mode="nearest")


# family -> (block on 8 channels, its output channels, the branch rules its walk must use)
FAMILIES = {"ghostnet": (GhostBlock, 8, {"fan-out"}), "res2net": (Res2Block, 8, {"fan-out", "fan-in"}),
            "densenet-preact": (PreactDenseBlock, 20, {"fan-out"}),
            "cspdarknet": (CSPBlock, 8, set()),   # the split halves' source is the segment input
            "hrnet": (HRFuse, 8, {"fan-out", "fan-in"})}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_branchy_family_blocks_map_every_conv(workdir, family):
    """Plain-torch re-implementations of the families issue 13 found refused ("feeds several
    branches inside segment"): every conv output mapped, the final tensor the head's ReLU,
    parity, every solve converged, abandonment, and the branch rules expected."""
    block, cout, branch_rules = FAMILIES[family]
    torch.manual_seed(0)
    model = TinyHead(block(8), cout, stem=8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = workdir / f"family_{family}.onnx"
    export(model.eval(), path, (1, 3, SIZE, SIZE), preprocess="none",
           keep_batchnorm=family == "densenet-preact")
    an = nf.Analyzer(str(path))
    image = np.random.default_rng(5).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    flow = an.analyze(image, keep_tensors=True)
    assert flow.parity["max_relative_error"] <= 1e-4
    mapped = {layer.tensor for layer in flow.layers}
    convs = {n.outputs[0] for n in an.graph.nodes if n.op_type == "Conv"}
    assert convs <= mapped, convs - mapped
    assert flow.model["final_tensor"] == [n for n in an.graph.nodes if n.op_type == "Relu"][-1].outputs[0]
    rules = {layer.solver["rule"].split(" (")[0] for layer in flow.layers if layer.solver}
    assert branch_rules <= rules, rules
    bpfm, lam = flow.tensors.BPFM, flow.tensors.Lambda
    for layer in flow.layers:
        assert layer.solver is None or layer.solver.get("converged", True), layer.solver
        assert bool((bpfm[layer.tensor][lam[layer.tensor] == 0] == 0).all()), layer.tensor
