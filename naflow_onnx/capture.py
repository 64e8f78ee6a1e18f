"""Forward capture with onnxruntime: every intermediate tensor exposed as an output.

The provider is chosen automatically (CUDA when onnxruntime-gpu and a GPU are present, else CPU);
``provider`` overrides it.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort

from .errors import NAFlowError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ort.set_default_logger_severity(4)  # errors reach the user once, as our own one-line message


def _first_line(exc: Exception) -> str:
    """onnxruntime's message without its source-file prefix, on one line."""
    import re
    text = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r"/onnxruntime_src/\S+:\d+ ", "", text)[:400]


def choose_provider(requested: str | None = None) -> str:
    available = ort.get_available_providers()
    if requested and requested != "auto":
        name = PROVIDERS.get(requested.lower(), requested)
        if name not in available:
            raise NAFlowError(f"onnxruntime provider '{requested}' is not available here "
                              f"(available: {', '.join(available)})")
        return name
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"


class Capture:
    """An onnxruntime session that returns every node output by name."""

    def __init__(self, model: onnx.ModelProto, provider: str | None = None, threads: int = 0):
        exposed = copy.deepcopy(model)
        for inp in exposed.graph.input:   # 0 or -1 means dynamic (graph.load_model): say so
            for i, dim in enumerate(inp.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    dim.dim_param = f"dynamic_{i}"
        present = {o.name for o in exposed.graph.output}
        for node in exposed.graph.node:
            for name in node.output:
                if name and name not in present:
                    exposed.graph.output.append(onnx.ValueInfoProto(name=name))
                    present.add(name)
        self.provider = choose_provider(provider)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        # no memory arena: this session hands every intermediate tensor back as a new array, and
        # an arena that grew once for them kept ~100 MB more resident on ResNet-50 (the peak of
        # a second analysis in a process: 346 MB, else 242 MB; bench/throughput.py), for 57 ms
        # more of capture (82 -> 139 ms at 1 thread)
        options.enable_cpu_mem_arena = False
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(exposed.SerializeToString(), options,
                                                providers=[self.provider])
        except Exception as exc:
            raise NAFlowError(f"onnxruntime cannot load the model: {_first_line(exc)}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every node output by name, or only ``names`` (onnxruntime then computes what they
        need and hands back only them)."""
        try:
            outs = self.session.run(names, {self.input_name: x})
        except Exception as exc:
            raise NAFlowError(f"onnxruntime failed on this input: {_first_line(exc)}") from None
        return dict(zip(names or self.output_names, outs))
