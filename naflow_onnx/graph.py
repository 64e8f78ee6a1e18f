"""What to compute: load an ONNX model, find its feature tensors, the final feature tensor, the
target score, and split the data path into segments at articulation tensors (METHOD.md §0-§5).

Two stages. ``load_model`` validates the file and rebuilds every node (fails early, naming every
unsupported op). ``plan`` needs concrete shapes (from one forward pass) and decides where each
inverse rule applies.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import onnx
import torch
from onnx import numpy_helper

from .errors import ModelError, UnsupportedOpError
from . import ops
from .rebuild import RebuiltNode, rebuild_node, unsupported_nodes

DEFAULT_MAX_BYTES = 2 * 1024**3
_NCHW = (0, 1, 2, 3)


@dataclass
class ModelGraph:
    """A validated ONNX model with every node rebuilt as a torch function."""

    model: onnx.ModelProto
    path: Path | None
    sha256: str
    opset: int
    input_name: str
    input_shape: list  # ints, None where dynamic
    output_name: str
    score_name: str
    nodes: list[RebuiltNode]
    producer: dict[str, int]
    constants: dict[str, torch.Tensor]
    metadata: dict[str, str]
    float_tensors: set[str]

    def node_of(self, tensor: str) -> RebuiltNode | None:
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i]


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base.resolve() not in target.parents:
            raise ModelError(f"external data of initializer '{init.name}' points outside the "
                             f"model's folder ('{loc}'): refused")
        if not target.is_file():
            raise ModelError(f"external data file '{loc}' of initializer '{init.name}' is missing")


def read_model(source, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[onnx.ModelProto, Path | None, str]:
    """Read and validate an ONNX file (or take a ModelProto). Returns (model, path, sha256)."""
    if isinstance(source, onnx.ModelProto):
        blob = source.SerializeToString()
        return source, None, hashlib.sha256(blob).hexdigest()
    path = Path(source)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path}: empty file, not an ONNX model")
    if size > max_bytes:
        raise ModelError(f"{path}: {size} bytes exceeds the size limit of {max_bytes} bytes "
                         "(raise it with --max-model-bytes)")
    blob = path.read_bytes()
    try:
        model = onnx.load_model_from_string(blob)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{path}: not a valid ONNX file (truncated or not ONNX: "
                         f"{type(exc).__name__})") from None
    if not model.graph.node or not model.graph.input:
        raise ModelError(f"{path}: not an ONNX model (no graph nodes or inputs)")
    _check_external_data(model, path.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelError(f"{path}: external data could not be loaded: {exc}") from None
    return model, path, hashlib.sha256(blob).hexdigest()


def load_model(source, max_bytes: int = DEFAULT_MAX_BYTES, output: str | None = None,
               cache=None) -> ModelGraph:
    """``cache`` (``Analyzer``'s setting, cache.py): the checker's pass and shape inference's
    result are read from / kept in the user cache, by the model's sha256."""
    from . import cache as cache_mod
    model, path, sha = read_model(source, max_bytes)
    where = path or "model"
    store = cache_mod.ModelCache.open(cache, sha)
    # a ModelProto given by the caller is not changed in place
    cached = cache_mod.load_checked(store, model, in_place=path is not None) if store else None
    model = cached if cached is not None else check_and_infer(model, where)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    g = model.graph

    bad = unsupported_nodes(list(g.node), opset)
    if bad:
        listing = ", ".join(f"{op} (node '{name}')" for op, name in bad)
        raise UnsupportedOpError(f"{where}: unsupported ops: {listing}")

    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(f"{where}: the model has {len(inputs)} inputs ({names}); "
                         "exactly one image input is supported")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    # -1 and 0 (Paddle's and some converters' "dynamic") and symbols are dynamic (None)
    input_shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                   for d in dims]
    if len(input_shape) != 4:
        raise ModelError(f"{where}: input '{inp.name}' has rank {len(input_shape)}; "
                         "an image input of rank 4 (NCHW or NHWC) is needed")

    nodes = [rebuild_node(n, i, opset) for i, n in enumerate(g.node)]
    for n in nodes:
        pad = n.attrs.get("auto_pad")
        if pad is not None and pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
            raise UnsupportedOpError(f"{where}: unsupported attribute auto_pad='{pad}' at {n.where()}")
    producer: dict[str, int] = {}
    dag = nx.DiGraph()
    for n in nodes:
        dag.add_node(n.index)
        for t in n.outputs:
            if t:
                producer[t] = n.index
    for n in nodes:
        for t in n.inputs:
            if t in producer:
                dag.add_edge(producer[t], n.index)
    if not nx.is_directed_acyclic_graph(dag):
        cycle = nx.find_cycle(dag)
        raise ModelError(f"{where}: the graph has a cycle through node '{nodes[cycle[0][0]].name}'")
    order = list(nx.lexicographical_topological_sort(dag))
    if order != sorted(order):
        nodes = [nodes[i] for i in order]
        for new, n in enumerate(nodes):
            n.index = new
        producer = {t: n.index for n in nodes for t in n.outputs if t}

    outputs = [o.name for o in g.output]
    output_name = output or outputs[0]
    if output_name not in producer and output_name != inp.name:
        raise ModelError(f"{where}: output '{output_name}' is not produced by any node")
    score = _score_tensor(nodes, producer, output_name)

    constants = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in g.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                   onnx.TensorProto.BFLOAT16}
    float_tensors = {v.name for v in list(g.value_info) + list(g.output) + list(g.input)
                     if v.type.tensor_type.elem_type in float_types}
    metadata = {p.key: p.value for p in model.metadata_props}
    if store is not None and cached is None:      # a model refused above leaves no entry
        cache_mod.save_checked(store, model)
    return ModelGraph(model=model, path=path, sha256=sha, opset=opset, input_name=inp.name,
                      input_shape=input_shape, output_name=output_name, score_name=score,
                      nodes=nodes, producer=producer, constants=constants, metadata=metadata,
                      float_tensors=float_tensors)


def check_and_infer(model: onnx.ModelProto, where) -> onnx.ModelProto:
    """``model`` after onnx.checker (ModelError unless it passes; a deprecated op version is
    accepted) and shape inference (when it fails, the model as it is)."""
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # an op version that a later opset replaced (GroupNormalization-18, whose scale is per
        # group) is still valid ONNX that onnxruntime runs: only a deprecation is accepted
        if not first.endswith(tuple(f"is deprecated in domain_version of {v}" for v in range(1, 100))):
            raise ModelError(f"{where}: fails onnx.checker: {first}") from None
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:
        return model  # shapes come from the forward pass; inference only gives dtypes early


def _score_tensor(nodes: list[RebuiltNode], producer: dict[str, int], output: str) -> str:
    """The pre-probability score: the input of a Softmax/LogSoftmax/Sigmoid under the output
    (possibly beneath shape-only ops), else the output itself."""
    probe = output
    while probe in producer:
        node = nodes[producer[probe]]
        if ops.is_probability(node):  # the paper explains pre-softmax scores (METHOD.md §2)
            return node.inputs[0]
        if not ops.is_shape_only(node):
            break
        probe = node.inputs[0]
    return output


def embedding_tensor(mg: "ModelGraph", output: str) -> str:
    """The embedding before any L2 normalisation (METHOD.md §6): walks back from ``output``
    through shape-only ops, LpNormalization, and a Div of a tensor by a function of itself."""
    probe = output
    while probe in mg.producer:
        node = mg.nodes[mg.producer[probe]]
        if ops.is_shape_only(node) or node.op_type == "LpNormalization":
            probe = node.inputs[0]
            continue
        if node.op_type == "Div" and _depends_on(mg, node.inputs[1], node.inputs[0]):
            probe = node.inputs[0]
            continue
        break
    return probe


def _depends_on(mg: "ModelGraph", tensor: str, source: str) -> bool:
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t == source:
            return True
        if t in seen or t not in mg.producer:
            continue
        seen.add(t)
        stack.extend(i for i in mg.nodes[mg.producer[t]].inputs if i)
    return False


@dataclass
class Segment:
    """A single-input piece of the data path between two articulation tensors: one output, or
    (the top segment of a model with several final tensors) the final tensors it computes."""

    id: int
    input: str
    output: str
    nodes: list[int]  # node indices, forward order
    joint: bool       # inverted jointly (several nodes, or one node using its input twice)
    outputs: tuple = ()   # every output tensor (default: ``(output,)``)

    def __post_init__(self):
        self.outputs = tuple(self.outputs) or (self.output,)


@dataclass
class Plan:
    """Where each rule applies, for one input shape."""

    data: set[str]                # float tensors on a path from the image to the score
    edges: nx.DiGraph             # tensor DAG of the data path
    features: list[str]           # feature tensors in forward order (mapped)
    final: str                    # the last of the final tensors in forward order
    segments: list[Segment]
    segment_of: dict[str, int]    # tensor -> segment id (its producing node's segment)
    gates: dict[int, str]         # node index of Mul/Div/Add/Sub -> its frozen operand
    skipped: dict[str, str] = field(default_factory=dict)  # 4-D tensors not mapped, and why
    coverage: dict = field(default_factory=dict)  # spatial conv outputs mapped / total
    finals: tuple = ()            # every final feature tensor (BPFM = A), forward order

    def __post_init__(self):
        self.finals = tuple(self.finals) or (self.final,)

    def data_inputs(self, node: RebuiltNode) -> list[str]:
        gate = self.gates.get(node.index)
        return [t for t in node.inputs if t in self.data and t != gate]


def _sigmoid_gate(mg: ModelGraph, t: str, data: set[str]) -> bool:
    """Whether ``t`` is computed from a Sigmoid/HardSigmoid through single-data-input ops."""
    probe = t
    while probe in mg.producer:
        p = mg.nodes[mg.producer[probe]]
        if ops.is_gate_source(p):
            return True
        if not ops.is_gate_path(p):
            return False
        ins = [i for i in p.inputs if i in data]
        if len(ins) != 1:
            return False
        probe = ins[0]
    return False


def _copies_of(mg: ModelGraph, t: str, data: set[str]) -> list[str]:
    """``t`` and the tensors it is a scaled copy of (x, x/√2, 0.5·x: one data operand each)."""
    out = [t]
    while t in mg.producer:
        p = mg.nodes[mg.producer[t]]
        ins = list(dict.fromkeys(i for i in p.inputs if i in data))
        if not ops.is_scaled_copy(p) or len(ins) != 1:
            break
        t = ins[0]
        out.append(t)
    return out


def frozen_operands(mg: ModelGraph, edges: nx.DiGraph, data: set[str],
                    values: dict[str, torch.Tensor]) -> dict[int, str]:
    """Node index -> its frozen operand (METHOD.md §4, docs/method.md "Frozen operands").

    A binary Mul/Div whose operand ``s`` depends on the image only through the other operand
    ``x`` (``x``, or a tensor ``x`` is a scaled copy of, dominates ``s`` in the data DAG): SE, CBAM
    and BAM gates, self-gated activations (``x·sigmoid(x)``, ``x·Clip(x+3,0,6)``, GELU, Mish),
    normalisation denominators. ``s`` is held at its forward value; for Div only the denominator.
    Add/Sub only when ``s`` is a broadcast statistic (fewer elements than ``x``: a decomposed
    norm's mean), never a full-shape residual branch. A Mul by a Sigmoid gate computed from
    elsewhere (the previous rule) stays frozen too."""
    idom = nx.immediate_dominators(edges, mg.input_name)

    def dominates(a: str, b: str) -> bool:
        while b != mg.input_name:
            b = idom[b]
            if b == a:
                return True
        return a == mg.input_name

    frozen: dict[int, str] = {}
    for n in mg.nodes:
        if not ops.is_freezable(n):
            continue
        operands = [t for t in n.inputs[:2] if t in data]
        if len(operands) != 2 or operands[0] == operands[1] or not all(o in edges for o in operands):
            continue
        a, b = operands
        pairs = [(a, b)] if n.op_type == "Div" else [(a, b), (b, a)]
        for x, s in pairs:
            if n.op_type in ("Add", "Sub") and values[s].numel() >= values[x].numel():
                continue
            if any(dominates(c, s) for c in _copies_of(mg, x, data)):
                frozen[n.index] = s
                break
        if n.index not in frozen and n.op_type == "Mul":
            gate = next((t for t in (a, b) if _sigmoid_gate(mg, t, data)), None)
            if gate is not None:
                frozen[n.index] = gate
    return frozen


def _layouts(mg: ModelGraph, data: set[str], frozen: dict[int, str],
             values: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Each data tensor's axis layout: the canonical N×C×H×W axis each of its axes holds, for
    tensors computed from a convolution's output by layout-keeping ops and Transposes (an NHWC
    tensor between two Transposes is (0, 2, 3, 1)); absent where the layout is lost.

    A Reshape keeps the elements' row-major order: a tensor reshaped (N×C×H×W -> N×G×(C/G·H·W)
    in torch's GroupNorm export), changed only by shape-keeping element-wise ops, and reshaped
    back to the same shape has its layout again."""
    layout: dict[str, tuple] = {}
    flat: dict[str, tuple] = {}   # reshaped tensor -> (layout, shape) it was reshaped from
    for n in mg.nodes:
        outs = [o for o in n.outputs if o in data]
        if not outs:
            continue
        ins = [t for t in n.inputs if t in data and t != frozen.get(n.index)]
        lays = {layout.get(t) for t in ins}
        lay = next(iter(lays)) if len(lays) == 1 else None
        new = None
        if ops.makes_features(n):
            new = _NCHW
        elif n.op_type in ("Reshape", "Flatten") and len(ins) == 1:
            src = (lay, tuple(values[ins[0]].shape)) if lay is not None else flat.get(ins[0])
            if src is not None and tuple(values[outs[0]].shape) == src[1]:
                new = src[0]           # reshaped back: the layout returns
            elif src is not None:
                flat[outs[0]] = src
        elif lay is None:
            if (ops.keeps_layout(n) and len(ins) == 1 and ins[0] in flat
                    and len(outs) == 1 and values[outs[0]].shape == values[ins[0]].shape):
                flat[outs[0]] = flat[ins[0]]
            continue
        elif n.op_type == "Transpose":
            perm = list(n.attr("perm", list(reversed(range(len(lay))))))
            new = tuple(lay[p] for p in perm) if len(perm) == len(lay) else None
        elif ops.keeps_layout(n):
            new = lay
        elif (n.op_type == "MatMul" and ins == [n.inputs[0]] and n.inputs[1] not in data
              and values[n.inputs[1]].dim() == 2 and lay[-1] == 1):
            new = lay   # a Linear layer over the channel axis (ConvNeXt's MLP in NHWC)
        for o in outs:
            if new is not None and values[o].dim() == len(new):
                layout[o] = new
    return layout


def plan(mg: ModelGraph, values: dict[str, torch.Tensor], score: str | None = None,
         dense: bool = False) -> Plan:
    """Decide feature tensors, final tensors and segments, given one forward pass's values.
    ``score`` is the tensor the target is read from (default: the class score tensor);
    ``dense``: a per-location target (a box or a region of a detector's or segmenter's output),
    whose final tensors are the feature maps its head branches read (several for a multi-scale
    head); otherwise the one final tensor on the dominator chain of the score."""
    score = score or mg.score_name
    def is_float(t: str) -> bool:
        v = values.get(t)
        return v is not None and v.is_floating_point()

    reach = {mg.input_name}
    full = nx.DiGraph()
    for n in mg.nodes:
        ins = [t for t in n.inputs if t in reach]
        if not ins:
            continue
        for o in n.outputs:
            if o and is_float(o):
                reach.add(o)
                for i in ins:
                    full.add_edge(i, o)
    if score not in reach:
        raise ModelError(f"the score tensor '{score}' does not depend on the input image")
    data = nx.ancestors(full, score) | {score}
    full = full.subgraph(data).copy()

    gates = frozen_operands(mg, full, data, values)
    # a frozen operand's edge is left out: its branch carries no BPFM and does not join segments
    edges = nx.DiGraph(full)
    for idx, s in gates.items():
        for o in mg.nodes[idx].outputs:
            if edges.has_edge(s, o):
                edges.remove_edge(s, o)
    valued = nx.ancestors(edges, score) | {score}
    edges = edges.subgraph(valued).copy()

    layout = _layouts(mg, data, gates, values)

    def feature_map(t: str) -> bool:
        return layout.get(t) == _NCHW

    def spatial(t: str) -> bool:
        v = values[t]
        return v.dim() == 4 and v.shape[2] * v.shape[3] > 1

    idom = nx.immediate_dominators(edges, mg.input_name)
    order = {t: i for i, t in enumerate(nx.lexicographical_topological_sort(
        full, key=lambda t: mg.producer.get(t, -1)))}
    if dense:
        finals = _dense_finals(edges, idom, score, mg.input_name,
                               lambda t: feature_map(t) and spatial(t))
        finals = sorted(finals, key=order.get)
    else:
        chain = _dominators(idom, score, mg.input_name)
        final = next((t for t in chain if feature_map(t) and spatial(t)), None)
        finals = [final] if final is not None else []
    if not finals:
        raise ModelError("no 4-D feature tensor (N×C×H×W after a convolution, H·W > 1) lies on "
                         "every path from the image to the score: nothing to map")
    final = finals[-1]

    upstream = set().union(*(nx.ancestors(edges, f) | {f} for f in finals))
    sub = edges.subgraph(upstream)
    # the articulation tensors below the finals: every path from the image to a final passes
    # through them (one final: its dominators; several: those of a sink reading all of them)
    sink = ("naflow", "sink")
    top = nx.DiGraph(sub)
    top.add_edges_from((f, sink) for f in finals)
    artic = sorted(_dominators(nx.immediate_dominators(top, mg.input_name), sink, mg.input_name),
                   key=order.get)

    segments: list[Segment] = []
    segment_of: dict[str, int] = {}
    stops = artic + ([] if len(finals) == 1 else [None])
    for a, b in zip(stops, stops[1:]):
        outs = [b] if b is not None else [f for f in finals if f not in artic]
        inner = set().union(*((nx.descendants(sub, a) & nx.ancestors(sub, o)) | {o} for o in outs))
        nodes = sorted({mg.producer[t] for t in inner})
        first = mg.nodes[nodes[0]]
        ins = [t for t in first.inputs if t in data and t != gates.get(first.index)]
        joint = len(nodes) > 1 or len(ins) != 1
        seg = Segment(id=len(segments), input=a, output=outs[-1], nodes=nodes, joint=joint,
                      outputs=tuple(outs))
        segments.append(seg)
        for t in inner:
            segment_of[t] = seg.id

    features, skipped = [], {}
    everything = set().union(*(nx.ancestors(full, f) for f in finals)) | set(finals) \
        | (valued - {score})
    for t in sorted(everything, key=order.get):
        v = values[t]
        if t == mg.input_name or v.dim() != 4:
            continue
        if t not in upstream and t in valued:
            skipped[t] = "after the final feature tensor (the head)"
        elif t not in valued or t not in upstream:
            skipped[t] = "frozen operand branch (gates and statistics get no BPFM, METHOD.md §4)"
        elif not feature_map(t):
            skipped[t] = ("permuted layout (not N×C×H×W)" if t in layout else
                          "not a feature map (before the first convolution, or reshaped)")
        elif not spatial(t):
            skipped[t] = "spatial size 1×1"
        else:
            features.append(t)
    # a dense target's head (after the finals) predicts per location: its convs are not counted
    head = set().union(*(nx.descendants(edges, f) for f in finals)) - upstream if dense else set()
    convs = [o for n in mg.nodes if ops.makes_features(n)
             for o in n.outputs if o in valued and spatial(o) and o not in head]
    mapped = set(features)
    unmapped = [t for t in convs if t not in mapped]
    coverage = {"mapped": len(convs) - len(unmapped), "total": len(convs),
                "ratio": (len(convs) - len(unmapped)) / len(convs) if convs else 1.0,
                "unmapped": unmapped}
    return Plan(data=data, edges=sub, features=features, final=final, segments=segments,
                segment_of=segment_of, gates=gates, skipped=skipped, coverage=coverage,
                finals=tuple(finals))


def _dominators(idom: dict, t, start: str) -> list:
    """The dominators of ``t`` from its immediate one down to ``start``."""
    chain = []
    while t != start:
        t = idom[t]
        chain.append(t)
    return chain


def _dense_finals(edges: nx.DiGraph, idom: dict, score: str, start: str, is_feature) -> set[str]:
    """The final tensors of a per-location target (detector, segmenter; METHOD.md §4): the last
    spatial feature tensors on the paths to the score (a detector's per-scale prediction maps,
    a segmenter's logits), each replaced by the tensor its head branch reads: its nearest
    dominator that is a spatial feature tensor (YOLOv8's box and class towers read one neck
    output; a segmenter's logit layer reads one feature map). Every path from the image to the
    score passes through one of them."""
    last, stack, seen = set(), [score], {score}
    while stack:
        t = stack.pop()
        if t != score and is_feature(t):
            last.add(t)
            continue
        for p in edges.predecessors(t):
            if p not in seen:
                seen.add(p)
                stack.append(p)
    finals = set()
    for h in last:
        d = next((t for t in _dominators(idom, h, start) if is_feature(t)), None)
        finals.add(d if d is not None else h)
    return finals


def metadata_json(mg: ModelGraph, key: str):
    raw = mg.metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
