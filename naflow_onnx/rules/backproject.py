"""Where the rules apply: walk the segments from the final feature tensor back to the first
feature tensor (METHOD.md §4-§5), producing the BPFM of every tensor on the way.

- a one-node segment: its op's rule;
- a multi-node segment: a joint anchored least-squares inverse of the whole rebuilt subgraph,
  then, inside it, tensor by tensor from its output back: a residual join's shortcut operand is
  known by forward-propagating the segment input's BPFM; a node with several unknown data
  inputs (fan-in) gets their joint least squares; a tensor read by several nodes (fan-out) the
  stacked least squares over its readers; any other tensor its one reader's rule;
- after every rule: abandonment, ``BPFM = x_hat * [Lambda != 0]``.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import networkx as nx
import torch

from ..errors import UnsupportedOpError
from ..forward import run_nodes
from ..graph import ModelGraph, Plan, Segment
from ..ops import is_fan_in, is_join, record, rule_for
from . import RuleContext
from .affine import AffineRule
from .elementwise import ArithmeticRule, BatchNormRule
from .linearize import JointMap, SegmentMap, StackedMap, node_map
from .structural import StructuralRule
from .solver import PerImage, SolverOptions, SolveRecord, flatten, solve_affine


def segment_function(mg: ModelGraph, env: dict, seg: Segment,
                     images: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        local = dict(env)
        local[seg.input] = x
        out = run_nodes(mg, local, seg.nodes)
        if len(seg.outputs) == 1:
            return out[seg.output]
        return flatten([out[o] for o in seg.outputs], images)
    return f


class BackProjection:
    """BPFMs and solver records for one forward point."""

    def __init__(self, mg: ModelGraph, plan: Plan, env: dict[str, torch.Tensor],
                 lam: dict[str, torch.Tensor], opts: SolverOptions):
        self.mg, self.plan, self.env, self.lam = mg, plan, env, lam
        # the images of a batch (dim 0 of the input): every solve is per image
        self.images = int(env[mg.input_name].shape[0])
        self.opts = replace(opts, images=self.images)
        self.bpfm: dict[str, torch.Tensor] = {}
        self.records: dict[str, dict] = {}   # tensor -> how its BPFM was obtained

    def abandon(self, name: str, x_hat: torch.Tensor) -> torch.Tensor:
        g = self.lam.get(name)
        if g is None:
            return torch.zeros_like(x_hat)
        return torch.where(g != 0, x_hat, 0.0).detach()

    def run(self, progress: Callable[[int], None] | None = None,
            needed: set[str] | None = None,
            release: Callable[[dict[str, torch.Tensor]], None] | None = None
            ) -> dict[str, torch.Tensor]:
        """Walk back from the final tensors far enough to reach every tensor in ``needed``
        (default: every feature tensor). With ``release``, every BPFM the walk no longer needs
        (its segment is done and it is not the input of one still to come) is handed to
        ``release`` and dropped: the walk then holds the BPFMs of about one segment at a time."""
        plan = self.plan
        for final in plan.finals:
            self.bpfm[final] = self.env[final].detach()
            self.records[final] = {"rule": "final", "kind": "identity"}
        features = set(plan.features) if needed is None else set(needed)

        todo = list(reversed(walked(self.mg, plan, features)))
        for k, seg in enumerate(todo):
            if seg.joint:
                self._joint(seg)
            else:
                self._single(seg)
            if progress:
                progress(1)
            if release is not None:
                later = {s.input for s in todo[k:]}
                done = set(seg.outputs) | {o for i in seg.nodes for o in self.mg.nodes[i].outputs}
                release({t: self.bpfm.pop(t) for t in [t for t in self.bpfm if t in done
                                                       and t not in later]})
        if release is not None:
            release({t: self.bpfm.pop(t) for t in list(self.bpfm)})
        return self.bpfm

    def _context(self, node, known=None) -> RuleContext:
        plan = self.plan
        data = list(dict.fromkeys(plan.data_inputs(node)))
        return RuleContext(node=node, env=self.env, data_inputs=data,
                           bpfm_out={o: self.bpfm[o] for o in node.outputs if o in self.bpfm},
                           opts=self.opts, gate=plan.gates.get(node.index), known=known or {},
                           lam_out={o: self.lam[o] for o in node.outputs if o in self.lam})

    def _single(self, seg: Segment) -> None:
        node = self.mg.nodes[seg.nodes[0]]
        cands, rec = rule_for(node).invert(self._context(node))
        self.bpfm[seg.input] = self.abandon(seg.input, cands[seg.input])
        self.records[seg.input] = {"rule": node.op_type, "node": node.name, "segment": seg.id,
                                   **rec.as_dict()}

    def _joint(self, seg: Segment) -> None:
        mg, env = self.mg, self.env
        f = segment_function(mg, env, seg, self.images)
        # J linearised once at the forward point (reference mode: torch.func on the whole segment)
        J = None if self.opts.reference else SegmentMap(mg, env, seg.nodes, seg.input, seg.outputs,
                                                         self.images)
        target = self.bpfm[seg.output] if len(seg.outputs) == 1 else \
            flatten([self.bpfm[o] for o in seg.outputs], self.images)
        x_hat, rec = solve_affine(f, env[seg.input], target, self.opts,
                                  f"segment {seg.id} ({seg.input} -> {', '.join(seg.outputs)})", J=J,
                                  point_key=("segment", seg.id))
        self.bpfm[seg.input] = self.abandon(seg.input, x_hat)
        self.records[seg.input] = {"rule": "segment", "segment": seg.id, "nodes": len(seg.nodes),
                                   **rec.as_dict()}
        self._inside(seg)

    def _inside(self, seg: Segment) -> None:
        """Per-node rules from the segment output back to its input (METHOD.md §5).

        Tensors are settled in reverse topological order: a tensor's BPFM is decided when the
        walk reaches its producer, after every consumer inside the segment has its BPFM. By its
        consumers that carry a BPFM: none (a gate branch) -> no BPFM; one -> that node's rule
        (a known shortcut, a fan-in, or the op's own rule); several -> the fan-out rule."""
        walk = _SegmentWalk(self, seg)
        for idx in reversed(seg.nodes):
            for o in self.mg.nodes[idx].outputs:
                if o in walk.inner and o not in self.bpfm:
                    walk.settle(o)

    def _settle(self, t: str, x_hat: torch.Tensor, record: dict) -> None:
        self.bpfm[t] = self.abandon(t, x_hat)
        self.records[t] = record


class _SegmentWalk:
    """The state of one walk inside a joint segment: which nodes read which tensor, the node
    rules already applied (a node's rule gives candidates for all its inputs at once), and the
    forward pass from the segment input's BPFM (the known shortcuts)."""

    def __init__(self, bp: BackProjection, seg: Segment):
        self.bp, self.seg = bp, seg
        mg, plan = bp.mg, bp.plan
        self.inner = {o for i in seg.nodes for o in mg.nodes[i].outputs if o in plan.data} \
            - set(seg.outputs)
        self.tensors = self.inner | set(seg.outputs)
        self.readers: dict[str, list[int]] = {}
        for idx in seg.nodes:
            for t in dict.fromkeys(plan.data_inputs(mg.nodes[idx])):
                self.readers.setdefault(t, []).append(idx)
        self.done: dict[int, tuple[dict, dict]] = {}   # node -> (candidates, record)
        self.shifted: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ which rule applies
    def live_readers(self, t: str) -> list:
        """Nodes of the segment that read ``t`` as data and whose output has a BPFM."""
        mg, bpfm = self.bp.mg, self.bp.bpfm
        return [mg.nodes[i] for i in self.readers.get(t, [])
                if any(o in bpfm for o in mg.nodes[i].outputs)]

    def settle(self, t: str) -> None:
        readers = self.live_readers(t)
        if not readers:
            return  # a gate branch: gates get no BPFM
        for node in readers:
            if self.shortcut_operand(node) == t:
                self.shortcut_bpfm(t)
                return
        if len(readers) == 1:
            cands, rec = self.node_rule(readers[0])
            if t not in cands:
                raise UnsupportedOpError(f"{readers[0].where()}: its rule gives no candidate for "
                                         f"its input '{t}' (segment {self.seg.id})")
            self.bp._settle(t, cands[t], rec)
        else:
            self.fan_out(t, readers)

    def shortcut_operand(self, node) -> str | None:
        """The known operand of a residual join: of the two data operands of an Add/Sub (no
        gate), the one with fewer tensors upstream in the segment, when it is the segment input
        or computed from it by linear ops only (identity or projection shortcut). None: the
        node is a fan-in (both operands are branches)."""
        plan = self.bp.plan
        data = list(dict.fromkeys(plan.data_inputs(node)))
        if not is_join(node) or len(data) != 2 or plan.gates.get(node.index):
            return None
        short = min(data, key=self.upstream)
        return short if short == self.seg.input or self.linear_from_input(short) else None

    def upstream(self, t: str) -> int:
        if t == self.seg.input:
            return 0
        return len((nx.ancestors(self.bp.plan.edges, t) | {t}) & self.tensors)

    def linear_from_input(self, t: str) -> bool:
        mg = self.bp.mg
        inside = (nx.ancestors(self.bp.plan.edges, t) | {t}) & self.tensors
        return all(_linear(mg.nodes[mg.producer[u]], self.bp.plan) for u in inside)

    def shortcut_bpfm(self, t: str) -> torch.Tensor:
        bp = self.bp
        if t not in bp.bpfm:
            if self.shifted is None:
                local = dict(bp.env)
                local[self.seg.input] = bp.bpfm[self.seg.input]
                self.shifted = run_nodes(bp.mg, local, self.seg.nodes)
            bp._settle(t, self.shifted[t], {"rule": "shortcut (forward from segment input)",
                                            "segment": self.seg.id, "kind": "exact"})
        return bp.bpfm[t]

    # ------------------------------------------------------------------ one reader
    def node_rule(self, node) -> tuple[dict, dict]:
        """Candidates for every data input of ``node`` from its output's BPFM, and the record."""
        if node.index in self.done:
            return self.done[node.index]
        bp, seg = self.bp, self.seg
        ctx = bp._context(node)
        short = self.shortcut_operand(node)
        unknown = [t for t in ctx.data_inputs if t != seg.input]
        if short is not None:
            ctx.known = {short: self.shortcut_bpfm(short)}
            cands, rec = rule_for(node).invert(ctx)
            record = {"rule": node.op_type, "node": node.name, "segment": seg.id, **rec.as_dict()}
        elif len(ctx.data_inputs) >= 2 and is_fan_in(node):
            cands, record = self.fan_in(node, ctx, unknown)
        else:
            cands, rec = rule_for(node).invert(ctx)
            record = {"rule": node.op_type, "node": node.name, "segment": seg.id, **rec.as_dict()}
        self.done[node.index] = (cands, record)
        return cands, record

    def fan_in(self, node, ctx, unknown: list[str]) -> tuple[dict, dict]:
        """k unknown data inputs of one node: the joint anchored least squares
        ``argmin ‖Σ J_i Δ_i − δ‖² + (tσ)² Σ‖Δ_i‖²``, J_i the node linearised at the forward
        point, δ = BPFM_out − f(unknowns at A, the segment input at its BPFM)."""
        bp = self.bp
        out = ctx.output()
        held = {t: bp.bpfm[t] for t in ctx.data_inputs if t == self.seg.input}
        maps = [node_map(bp.mg, bp.env, node, t, out, bp.images) for t in unknown]
        J = JointMap(maps, _run_with(node, bp.env, held, out), bp.images)
        x, rec = solve_affine(None, J.x0, ctx.bpfm_out[out], bp.opts,
                              f"{node.where()} (fan-in)", J=J, point_key=("fan-in", node.index))
        cands = dict(zip(unknown, J.split(x)))
        return cands, {"rule": f"fan-in (joint, k={len(unknown)})", "node": node.name,
                       "segment": self.seg.id, **rec.as_dict()}

    # ------------------------------------------------------------------ several readers
    def fan_out(self, t: str, readers: list) -> None:
        """``t`` read by m >= 2 nodes that carry a BPFM: the stacked anchored least squares
        ``argmin Σ_j ‖J_j Δ − δ_j‖² + (tσ)²‖Δ‖²``, J_j reader j linearised in t at the forward
        point, δ_j = BPFM_j − f_j(t at A, its other inputs at their BPFM where known). All
        readers copies or slices (Concat, Split, ...): the average of the slices, undamped like
        the copy rule itself (t = inf still gives Δ = 0, as everywhere)."""
        bp, seg = self.bp, self.seg
        names = ", ".join(f"'{n.name or n.op_type}'" for n in readers)
        maps, y0, target = [], [], []
        for node in readers:
            try:
                rule_for(node)
            except UnsupportedOpError as e:
                raise UnsupportedOpError(
                    f"tensor '{t}' feeds {len(readers)} branches inside segment {seg.id} (nodes "
                    f"{names}) and node '{node.name}' ({node.op_type}) cannot be linearised: no "
                    "fan-out rule (METHOD.md §5)") from e
            short = self.shortcut_operand(node)
            if short is not None and short != t:
                self.shortcut_bpfm(short)
            held = {u: bp.bpfm[u] for u in bp.plan.data_inputs(node) if u != t and u in bp.bpfm}
            for o in node.outputs:
                if o in bp.bpfm:
                    maps.append(node_map(bp.mg, bp.env, node, t, o, bp.images))
                    y0.append(_run_with(node, bp.env, held, o))
                    target.append(bp.bpfm[o])
        J = StackedMap(maps, y0, bp.images)
        rule = f"fan-out (stacked, m={len(readers)})"
        record = {"rule": rule, "nodes": [n.name for n in readers], "segment": seg.id}
        if all(_exact_split(n) for n in readers) and not math.isinf(bp.opts.damp):
            delta = flatten(target, bp.images) - J.y0
            count = J.rmatvec(J.matvec(torch.ones_like(J.x0)))
            dx = torch.where(count > 0, J.rmatvec(delta) / count.clamp(min=1), torch.zeros_like(count))
            bp._settle(t, bp.env[t] + dx, {**record, **SolveRecord(kind="exact").as_dict()})
            return
        x, rec = solve_affine(None, bp.env[t], flatten(target, bp.images), bp.opts,
                              f"tensor '{t}' (fan-out into {names})", J=J,
                              point_key=("fan-out", t))
        bp._settle(t, x, {**record, **rec.as_dict()})


# Op-type knowledge of the walk, in one place (to become registry queries):
def _exact_split(node) -> bool:
    """A copy, slice or permutation of its inputs (Concat, Split, Reshape, ...)."""
    return isinstance(rule_for(node), StructuralRule)


def _linear(node, plan) -> bool:
    """An affine op of its one data input (conv, BN, pool, copy, arithmetic with a constant):
    what a projection shortcut is made of."""
    r = rule_for(node)
    if isinstance(r, (AffineRule, StructuralRule, BatchNormRule)):
        return True
    return isinstance(r, ArithmeticRule) and len(set(plan.data_inputs(node))) == 1 \
        and not plan.gates.get(node.index)


def _run_with(node, env: dict, held: dict, output: str) -> torch.Tensor:
    """``output`` of ``node`` with the inputs in ``held`` replaced, the others at their forward values."""
    args = [held[t] if t in held else (env[t] if t else None) for t in node.inputs]
    return node.run(args)[node.outputs.index(output)].detach()


def walked(mg: ModelGraph, plan: Plan, features: set[str]) -> list[Segment]:
    """The segments the walk back inverts to reach ``features``: segments before the first one
    that holds a feature tensor (preprocessing) are not needed."""
    def maps_something(seg: Segment) -> bool:
        inner = {o for i in seg.nodes for o in mg.nodes[i].outputs} - set(seg.outputs)
        return seg.input in features or bool(inner & features)
    first = next((i for i, seg in enumerate(plan.segments) if maps_something(seg)),
                 len(plan.segments))
    return plan.segments[first:]


def refusals(mg: ModelGraph, plan: Plan, needed: set[str] | None = None) -> list[str]:
    """What the back-projection would refuse on this plan, found before any work is done (issue
    13): every node it would invert that has no inverse rule, named with its node. (Add/Sub/Mul/
    Div of two data tensors is a fan-in, METHOD.md §5; a frozen operand is held at its value.)"""
    found = []
    for seg in walked(mg, plan, set(plan.features) if needed is None else set(needed)):
        for idx in seg.nodes:
            node = mg.nodes[idx]
            data = list(dict.fromkeys(plan.data_inputs(node)))
            if seg.joint and all(t == seg.input for t in data):
                continue   # solved by the joint inverse of its segment
            rec = record(node)
            if rec is None or rec.rule is None:
                found.append(f"{node.op_type} (node '{node.name}', no inverse rule)")
    return found


def records_of_image(records: dict[str, dict], b: int) -> dict[str, dict]:
    """Image ``b``'s solver records out of a batch's (a ``PerImage`` field holds one value per
    image)."""
    return {t: {k: (v[b] if isinstance(v, PerImage) else v) for k, v in r.items()}
            for t, r in records.items()}


def backproject(mg: ModelGraph, plan: Plan, env: dict, lam: dict, opts: SolverOptions,
                progress=None, needed: set[str] | None = None, release=None
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    bp = BackProjection(mg, plan, env, lam, opts)
    bp.run(progress, needed, release)
    return bp.bpfm, bp.records


__all__ = ["backproject", "records_of_image", "refusals", "walked", "BackProjection",
           "segment_function", "SolveRecord"]
