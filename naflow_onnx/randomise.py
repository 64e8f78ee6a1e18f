"""ONNX weight randomisation: the one home of "which inputs of a graph are weights" and of
redrawing them (the check's sanity gate, evaluate's randomisation cascade, tampered test models).

``weight_bearing_nodes`` says which node inputs are learned parameters; ``randomise_onnx`` redraws
those of the top ``k`` nodes. Only numpy at import time; onnx where it is used.
"""
from __future__ import annotations

import numpy as np

def _constant_sources(model) -> dict:
    """name -> TensorProto for graph initializers, Constant nodes (``value``) and Identity
    nodes of those (the TorchScript exporter emits ``Identity`` for de-duplicated constants)."""
    src = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    src[node.output[0]] = a.t
        elif node.op_type == "Identity" and node.input[0] in src:
            src[node.output[0]] = src[node.input[0]]
    return src


def constant_value(model, name: str):
    """The numpy value of a constant tensor of the graph (see _constant_sources), or None."""
    from onnx import numpy_helper

    t = _constant_sources(model).get(name)
    return None if t is None else numpy_helper.to_array(t)


def weight_bearing_nodes(model) -> list[tuple[int, str, list[int]]]:
    """``[(node index, node name, [input slots of constant parameters])]``, reverse topological.

    Weight-bearing: an op whose registry record names parameter inputs (``ops.weight_inputs``:
    Conv/ConvTranspose/Gemm weight and bias, the normalisation layers' scale and bias) when its
    weight is a constant - the slots are those inputs that are constants - or a MatMul with a
    constant input (that slot). Constants are initializers, Constant nodes and Identity nodes of
    those. ONNX requires nodes in topological order, so reverse node order is a reverse
    topological order. Only the main graph is scanned. Unnamed nodes are called
    ``<op>_<index>``.
    """
    from .ops import weight_inputs   # the op registry says which inputs are parameters

    consts = _constant_sources(model)
    out = []
    for i, node in enumerate(model.graph.node):
        positions = weight_inputs(node)
        if not positions:
            continue
        if 0 in positions:   # either operand may be the weight (MatMul): the first constant one
            slots = [j for j in positions if j < len(node.input) and node.input[j] in consts][:1]
        else:
            if len(node.input) <= positions[0] or node.input[positions[0]] not in consts:
                continue  # weight is computed, not a parameter
            slots = [j for j in positions if j < len(node.input) and node.input[j] in consts]
        if slots:
            out.append((i, node.name or f"{node.op_type}_{i}", slots))
    return out[::-1]


def _prune_unused_constants(graph) -> None:
    """Drop initializers and constant-only Identity/Constant nodes nothing reads any more."""
    while True:
        used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        dead = [j for j, node in enumerate(graph.node)
                if node.op_type in ("Identity", "Constant") and not any(o in used for o in node.output)
                and (node.op_type == "Constant" or node.input[0] in {t.name for t in graph.initializer})]
        for j in reversed(dead):
            del graph.node[j]
        if not dead:
            break
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    for j in reversed(range(len(graph.initializer))):
        if graph.initializer[j].name not in used:
            del graph.initializer[j]


def randomise_onnx(model, k: int, seed: int = 0, include_bias: bool = True, skip: int = 0,
                   scale: float = 1.0, additive: bool = False):
    """A copy of ``model`` (onnx.ModelProto or path) with its last ``k`` weight-bearing nodes
    randomised (after skipping the ``skip`` last ones).

    For each of those nodes (see :func:`weight_bearing_nodes`) the weight - and the bias
    when ``include_bias`` - is replaced by ``normal(0, scale * std(original))`` (with
    ``additive``: that noise is added to the trained values, a milder corruption), same shape
    and dtype, drawn from ``numpy.random.default_rng([seed, node index, input slot])``. So the result is
    reproducible and the draw of a layer does not depend on k: model k extends model k-1,
    which is the cascading scheme of Adebayo et al. A zero bias stays zero. The new values
    are fresh initializers named ``naflow.random/<node>/<slot>`` wired to that node only, so a
    constant shared with other nodes is not changed for them; constants nothing reads any
    more are removed. Other parameters (e.g. BatchNormalization scale/shift, when the export
    did not fold them into the conv) are left as trained.
    Returns ``(model_copy, [names of the randomised nodes, top first])``.
    """
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = weight_bearing_nodes(out)[max(int(skip), 0):max(int(skip), 0) + max(int(k), 0)]
    consts = _constant_sources(out)
    taken = {t.name for t in out.graph.initializer} | {n for node in out.graph.node for n in node.output}
    new_inits = []
    for node_idx, node_name, slots in nodes:
        node = out.graph.node[node_idx]
        for slot in (slots if include_bias else slots[:1]):
            w = numpy_helper.to_array(consts[node.input[slot]])
            std = float(np.std(w.astype(np.float64)))
            rng = np.random.default_rng([int(seed), int(node_idx), int(slot)])
            noise = rng.normal(0.0, std * scale, size=w.shape)
            new = (w + noise if additive else noise).astype(w.dtype)
            name = base = f"naflow.random/{node_name}/{slot}"
            while name in taken:          # a model randomised before (a tampered copy)
                name = f"{base}#{len(taken)}"
            taken.add(name)
            new_inits.append(numpy_helper.from_array(new, name))
            node.input[slot] = name
    out.graph.initializer.extend(new_inits)
    _prune_unused_constants(out.graph)
    return out, [n for _, n, _ in nodes]
