"""torch -> ONNX for naflow: weights loaded safely, onnxruntime parity checked, and the
preprocessing, labels and embedding output written into metadata_props."""
from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from naflow_onnx.errors import NAFlowError
from naflow_onnx.io import atomic_file
from naflow_onnx.preprocess import METADATA_KEY as PREPROCESS_KEY
from naflow_onnx.preprocess import PRESETS
from naflow_onnx.labels import METADATA_KEY as LABELS_KEY

EMBEDDING_KEY = "naflow.embedding_output"
EXPORTERS = ("legacy", "dynamo")


def load_factory(spec: str):
    """'package.module:factory' -> the callable (the current folder is importable)."""
    if ":" not in spec:
        raise NAFlowError(f"'{spec}' is not MODULE:FACTORY (e.g. models.mobilenet_v2:MobileNetV2)")
    module_name, attr = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NAFlowError(f"cannot import module '{module_name}': {exc}") from None
    if not hasattr(module, attr):
        raise NAFlowError(f"module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def load_weights(model: torch.nn.Module, path, convert=None) -> None:
    """Load a state dict with ``weights_only=True`` (never unpickles code) and ``strict=True``."""
    path = Path(path)
    if not path.is_file():
        raise NAFlowError(f"weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NAFlowError(f"{path}: cannot load as a weights-only torch checkpoint "
                          f"({type(exc).__name__})") from None
    for key in ("state_dict", "model", "net"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if convert:
        sd = convert(sd)
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise NAFlowError(f"{path}: weights do not match the model: {first}") from None


def _preprocess_metadata(preprocess, size) -> str | None:
    if preprocess is None:
        return None
    if isinstance(preprocess, str):
        if preprocess not in PRESETS:
            raise NAFlowError(f"unknown preprocessing preset '{preprocess}'")
        d = {"name": preprocess, **PRESETS[preprocess]}
    else:
        d = dict(preprocess)
        if "scale" in d and "divisor" not in d:
            scale = float(d.pop("scale"))
            d["divisor"] = scale if scale > 1 else round(1.0 / scale, 6)
    d.setdefault("size", size)
    d.setdefault("layout", "NCHW")
    return json.dumps(d)


def export(model: torch.nn.Module, path, input_shape=(1, 3, 224, 224), *, exporter: str = "legacy",
           keep_batchnorm: bool = False, preprocess=None, labels=None,
           output_names: list[str] | None = None, embedding_output: str | None = None,
           opset: int = 17, dynamic_batch: bool = True, parity_tol: float = 1e-4) -> dict:
    """Export ``model`` (eval mode) to ``path`` atomically; returns a report with the parity error."""
    if exporter not in EXPORTERS:
        raise NAFlowError(f"--exporter must be one of {', '.join(EXPORTERS)}")
    model = model.eval()
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    names = output_names or (["logits"] if len(refs) == 1 else [f"output_{i}" for i in range(len(refs))])
    path = Path(path)
    with atomic_file(path) as tmp_path:
        tmp = str(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                axes = {n: {0: "batch"} for n in ["image"] + names} if dynamic_batch else None
                torch.onnx.export(model, (x,), tmp, dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=names, dynamic_axes=axes,
                                  do_constant_folding=not keep_batchnorm)
            else:
                torch.onnx.export(model, (x,), tmp, dynamo=True, input_names=["image"],
                                  output_names=names, optimize=not keep_batchnorm,
                                  external_data=False, verbose=False)
        proto = onnx.load(tmp)
        meta = {PREPROCESS_KEY: _preprocess_metadata(preprocess, list(input_shape[2:])),
                LABELS_KEY: labels if isinstance(labels, str) or labels is None else json.dumps(labels),
                EMBEDDING_KEY: embedding_output}
        for key, value in meta.items():
            if value is not None:
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, str(value)
        onnx.save(proto, tmp)
        import onnxruntime as ort
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        worst = 0.0
        for r, o in zip(refs, outs):
            r = r.detach().numpy()
            worst = max(worst, float(np.linalg.norm(r - o) / max(np.linalg.norm(r), 1e-12)))
        if worst > parity_tol:
            raise NAFlowError(f"exported model differs from torch: relative error {worst:.3g} > "
                              f"{parity_tol:g}")
    return {"path": str(path), "exporter": exporter, "opset": proto.opset_import[0].version,
            "parity_relative_error": worst, "nodes": len(proto.graph.node),
            "outputs": names}
