"""Where the rules apply: walk the segments from the final feature tensor back to the first
feature tensor (METHOD.md §4-§5), producing the BPFM of every tensor on the way.

- a one-node segment: its op's rule;
- a multi-node segment: a joint anchored least-squares inverse of the whole rebuilt subgraph,
  then, inside it, the per-node rules from its output back, where a residual join's shortcut
  operand is known by forward-propagating the segment input's BPFM;
- after every rule: abandonment, ``BPFM = x_hat * [Lambda != 0]``.
"""
from __future__ import annotations

from typing import Callable

import networkx as nx
import torch

from ..errors import UnsupportedOpError
from ..forward import run_nodes
from ..graph import ModelGraph, Plan, Segment
from . import RuleContext, rule_for
from .linearize import SegmentMap
from .solver import SolverOptions, SolveRecord, solve_affine


def segment_function(mg: ModelGraph, env: dict, seg: Segment) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        local = dict(env)
        local[seg.input] = x
        return run_nodes(mg, local, seg.nodes)[seg.output]
    return f


class BackProjection:
    """BPFMs and solver records for one forward point."""

    def __init__(self, mg: ModelGraph, plan: Plan, env: dict[str, torch.Tensor],
                 lam: dict[str, torch.Tensor], opts: SolverOptions):
        self.mg, self.plan, self.env, self.lam, self.opts = mg, plan, env, lam, opts
        self.bpfm: dict[str, torch.Tensor] = {}
        self.records: dict[str, dict] = {}   # tensor -> how its BPFM was obtained

    def abandon(self, name: str, x_hat: torch.Tensor) -> torch.Tensor:
        g = self.lam.get(name)
        if g is None:
            return torch.zeros_like(x_hat)
        return torch.where(g != 0, x_hat, torch.zeros_like(x_hat)).detach()

    def run(self, progress: Callable[[int], None] | None = None,
            needed: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Walk back from the final tensor far enough to reach every tensor in ``needed``
        (default: every feature tensor)."""
        plan = self.plan
        self.bpfm[plan.final] = self.env[plan.final].detach()
        self.records[plan.final] = {"rule": "final", "kind": "identity"}
        features = set(plan.features) if needed is None else set(needed)

        def maps_something(seg: Segment) -> bool:
            inner = {o for i in seg.nodes for o in self.mg.nodes[i].outputs} - {seg.output}
            return seg.input in features or bool(inner & features)
        # segments before the first one that holds a feature tensor (preprocessing) are not needed
        first = next((i for i, seg in enumerate(plan.segments) if maps_something(seg)),
                     len(plan.segments))
        for seg in reversed(plan.segments[first:]):
            if seg.joint:
                self._joint(seg)
            else:
                self._single(seg)
            if progress:
                progress(1)
        return self.bpfm

    def _context(self, node, known=None) -> RuleContext:
        plan = self.plan
        data = list(dict.fromkeys(plan.data_inputs(node)))
        return RuleContext(node=node, env=self.env, data_inputs=data,
                           bpfm_out={o: self.bpfm[o] for o in node.outputs if o in self.bpfm},
                           opts=self.opts, gate=plan.gates.get(node.index), known=known or {})

    def _single(self, seg: Segment) -> None:
        node = self.mg.nodes[seg.nodes[0]]
        cands, rec = rule_for(node).invert(self._context(node))
        self.bpfm[seg.input] = self.abandon(seg.input, cands[seg.input])
        self.records[seg.input] = {"rule": node.op_type, "node": node.name, "segment": seg.id,
                                   **rec.as_dict()}

    def _joint(self, seg: Segment) -> None:
        mg, env = self.mg, self.env
        f = segment_function(mg, env, seg)
        # J linearised once at the forward point (reference mode: torch.func on the whole segment)
        J = None if self.opts.reference else SegmentMap(mg, env, seg.nodes, seg.input, seg.output)
        x_hat, rec = solve_affine(f, env[seg.input], self.bpfm[seg.output], self.opts,
                                  f"segment {seg.id} ({seg.input} -> {seg.output})", J=J)
        self.bpfm[seg.input] = self.abandon(seg.input, x_hat)
        self.records[seg.input] = {"rule": "segment", "segment": seg.id, "nodes": len(seg.nodes),
                                   **rec.as_dict()}
        self._inside(seg)

    def _inside(self, seg: Segment) -> None:
        """Per-node rules from the segment output back to its input."""
        mg, plan = self.mg, self.plan
        tensors = {o for i in seg.nodes for o in mg.nodes[i].outputs if o in plan.data}
        shifted: dict[str, torch.Tensor] | None = None  # forward from BPFM at the input

        def upstream(t: str) -> int:
            return 0 if t == seg.input else len((nx.ancestors(plan.edges, t) | {t}) & tensors)

        for idx in reversed(seg.nodes):
            node = mg.nodes[idx]
            if not any(o in self.bpfm for o in node.outputs):
                continue  # a gate branch: gates get no BPFM
            ctx = self._context(node)
            if all(t == seg.input for t in ctx.data_inputs):
                continue  # its only candidate would be for the segment input, already solved
            if len(ctx.data_inputs) == 2 and node.op_type in ("Add", "Sub") and ctx.gate is None:
                short = min(ctx.data_inputs, key=upstream)
                if short not in self.bpfm:
                    if shifted is None:
                        local = dict(self.env)
                        local[seg.input] = self.bpfm[seg.input]
                        shifted = run_nodes(mg, local, seg.nodes)
                    self.bpfm[short] = self.abandon(short, shifted[short])
                    self.records[short] = {"rule": "shortcut (forward from segment input)",
                                           "segment": seg.id, "kind": "exact"}
                ctx.known = {short: self.bpfm[short]}
            cands, rec = rule_for(node).invert(ctx)
            for t, cand in cands.items():
                if t == seg.input or t in ctx.known:
                    continue
                if t in self.bpfm:
                    raise UnsupportedOpError(
                        f"tensor '{t}' feeds several branches inside segment {seg.id}: a fan-out "
                        "with no inverse rule (METHOD.md §5)")
                self.bpfm[t] = self.abandon(t, cand)
                self.records[t] = {"rule": node.op_type, "node": node.name, "segment": seg.id,
                                   **rec.as_dict()}


def backproject(mg: ModelGraph, plan: Plan, env: dict, lam: dict, opts: SolverOptions,
                progress=None, needed: set[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    bp = BackProjection(mg, plan, env, lam, opts)
    bp.run(progress, needed)
    return bp.bpfm, bp.records


__all__ = ["backproject", "BackProjection", "segment_function", "SolveRecord"]
