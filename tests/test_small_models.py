"""METHOD.md §8 properties 1, 3, 6, 7, 9 on small generated CNNs (chain with MaxPool and
LeakyReLU, residual with identity and stride-2 projection shortcuts, a sigmoid-gated block,
BatchNormalization kept unfolded), exported to ONNX and analysed end to end."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import naflow_onnx as nf
from exporters.torch_export import export

MODELS = ("chain", "residual", "gated", "residual_bn")


@pytest.fixture(scope="module")
def flows(small_models, small_image):
    out = {}
    for name in MODELS:
        model, path = small_models[name]
        analyzer = nf.Analyzer(path, damp=0.1, tol=1e-6)
        out[name] = analyzer.analyze(small_image, keep_tensors=True)
    return out


def torch_reference(model, image, index):
    """Activations and gradients of every leaf module output of the *torch* model (independent
    of the ONNX path), captured with hooks."""
    acts = []

    def hook(_m, _i, out):
        out.retain_grad()
        acts.append(out)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if len(list(m.children())) == 0 and not isinstance(m, torch.nn.Linear)]
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    logits = model(x)
    logits[0, index].backward()
    for h in handles:
        h.remove()
    return [(a.detach(), a.grad) for a in acts if a.dim() == 4 and a.grad is not None]


@pytest.mark.parametrize("name", MODELS)
def test_every_feature_layer_mapped_and_parity(flows, name):
    flow = flows[name]
    plan = flow.tensors.plan
    assert len(flow.layers) == len(plan.features) >= 6
    assert flow.parity["max_relative_error"] < 1e-4
    assert all(np.isfinite(m).all() for m in flow.maps.values())
    assert flow.solver_summary()["all_converged"]


@pytest.mark.parametrize("name", MODELS)
def test_final_layer_equals_gradcam(flows, small_models, small_image, name):
    """§8.1 against Grad-CAM computed on the torch model itself (hooks, autograd)."""
    flow = flows[name]
    model = small_models[name][0]
    A, grad = torch_reference(model, small_image, flow.target["index"])[-1]
    pre = (grad.mean((2, 3), keepdim=True) * A).sum(1)[0]
    t = flow.tensors
    ours = (t.Lambda[flow.final_layer] * t.BPFM[flow.final_layer]).sum(1)[0].cpu()
    scale = float(pre.abs().max())
    torch.testing.assert_close(ours, pre, rtol=1e-4, atol=1e-5 * scale)
    final = flow.maps[flow.final_layer]
    np.testing.assert_allclose(final, torch.relu(pre).numpy(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", MODELS)
def test_abandonment_exact_zero(flows, name):
    """§8.3: BPFM is exactly 0 wherever Lambda is 0 (dead ReLUs, MaxPool losers, padding)."""
    t = flows[name].tensors
    zeros_seen = 0
    for tensor, bpfm in t.BPFM.items():
        if tensor == flows[name].final_layer:
            continue
        mask = t.Lambda[tensor] == 0
        zeros_seen += int(mask.sum())
        assert torch.all(bpfm[mask] == 0), tensor
    assert zeros_seen > 0


@pytest.mark.parametrize("name", MODELS)
def test_lambda_equals_torch_autograd(flows, small_models, small_image, name):
    """§8.6: Lambda equals the gradient of the independent torch model, matched by activation."""
    flow = flows[name]
    ref = torch_reference(small_models[name][0], small_image, flow.target["index"])
    A = {k: v.cpu() for k, v in flow.tensors.A.items()}
    lam = {k: v.cpu() for k, v in flow.tensors.Lambda.items()}
    matched = 0
    for act, grad in ref:
        for tensor in flow.tensors.plan.features:
            a = A[tensor]
            if a.shape == act.shape and torch.allclose(a, act, rtol=1e-4, atol=1e-5):
                torch.testing.assert_close(lam[tensor], grad, rtol=1e-3, atol=1e-6)
                matched += 1
                break
    assert matched >= 4


def test_same_maps_from_both_exporters(workdir, small_models, small_image, flows):
    """§8.7 model-agnostic: the dynamo export of the same torch model gives the same maps."""
    model = small_models["residual"][0]
    path = workdir / "residual_dynamo.onnx"
    export(model, path, (1, 3, 32, 32), exporter="dynamo", preprocess="none")
    other = nf.Analyzer(path, damp=0.1, tol=1e-6).analyze(small_image, keep_tensors=True)
    base = flows["residual"]
    assert len(other.layers) == len(base.layers)
    for la, lb in zip(base.layers, other.layers):
        assert la.shape == lb.shape
        np.testing.assert_allclose(base.maps[la.tensor], other.maps[lb.tensor], rtol=1e-3,
                                   atol=1e-4 * max(1e-12, float(base.maps[la.tensor].max())))


def test_maps_change_when_weights_randomised(workdir, small_models, small_image, flows):
    """§8.9 sanity (Adebayo et al.): randomising the top layers changes the maps."""
    model = copy.deepcopy(small_models["residual"][0])
    torch.manual_seed(123)
    for module in (model.fc, model.b2.conv2, model.b2.conv1):
        for p in module.parameters():
            p.data = torch.randn_like(p) * p.data.std()
    path = workdir / "residual_random.onnx"
    export(model, path, (1, 3, 32, 32), preprocess="none")
    base = flows["residual"]
    rand = nf.Analyzer(path).analyze(small_image, target=base.target["index"])
    rhos = [spearmanr(base.maps[a.tensor].ravel(), rand.maps[b.tensor].ravel())[0]
            for a, b in zip(base.layers, rand.layers)]
    assert np.nanmean(rhos[-4:]) < 0.8, rhos


def test_infinite_damping_is_gradient_times_activation(small_models, small_image):
    """t -> inf gives BPFM = A [Lambda != 0], i.e. the map of gradient x activation (METHOD §4)."""
    path = small_models["chain"][1]
    a = nf.Analyzer(path, damp=float("inf")).analyze(small_image)
    b = nf.Analyzer(path).analyze(small_image, method="gradxact")
    for t in a.maps:
        np.testing.assert_allclose(a.maps[t], b.maps[t], rtol=1e-5, atol=1e-7)


def test_gated_block_gates_not_mapped(flows):
    flow = flows["gated"]
    assert any("gate" in reason for reason in flow.skipped.values())
    assert flow.tensors.plan.gates


def test_unfolded_batchnorm_is_kept(small_models):
    import onnx
    ops = {n.op_type for n in onnx.load(small_models["residual_bn"][1]).graph.node}
    assert "BatchNormalization" in ops
    ops = {n.op_type for n in onnx.load(small_models["residual"][1]).graph.node}
    assert "BatchNormalization" not in ops
