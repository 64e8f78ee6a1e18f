"""Inverse rules (METHOD.md §4 table): what each op's rule computes.

Which op uses which rule is the op registry's business (``naflow_onnx/ops/catalog.py``): a rule
class knows the maths, not the op types it serves. A rule turns the BPFM of a node's output into a candidate ``x_hat`` for each of its data inputs.
*Where* rules apply (segments, shortcuts, gates) is decided in ``backproject``; abandonment
(``x_hat * [Lambda != 0]``) is applied there too, so rules stay pure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..rebuild import RebuiltNode
from .solver import SolverOptions, SolveRecord


@dataclass
class RuleContext:
    node: RebuiltNode
    env: dict[str, torch.Tensor]        # forward activations and constants
    data_inputs: list[str]              # distinct data inputs (a gate operand excluded)
    bpfm_out: dict[str, torch.Tensor]   # BPFM of the node's outputs that have one
    opts: SolverOptions
    gate: str | None = None             # gate operand of a gated Mul
    known: dict[str, torch.Tensor] = field(default_factory=dict)  # inputs already solved
    # Lambda of the node's outputs: a layer with an affine tail (a norm's gamma, beta) abandons
    # its implicit normalised tensor where Lambda_out = 0, as its decomposed form does
    lam_out: dict[str, torch.Tensor] = field(default_factory=dict)

    def output(self) -> str:
        return next(o for o in self.node.outputs if o in self.bpfm_out)

    def fn_of(self, name: str, output: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The node as a function of one input, the others fixed at their forward values."""
        out_index = self.node.outputs.index(output or self.output())

        def f(x: torch.Tensor) -> torch.Tensor:
            args = [x if t == name else (self.env[t] if t else None) for t in self.node.inputs]
            return self.node.run(args)[out_index]
        return f


class InverseRule:
    """Base: subclasses set ``summary`` (README's "Supported ops" row) and implement ``invert``."""

    summary: str = ""

    def invert(self, ctx: RuleContext) -> tuple[dict[str, torch.Tensor], SolveRecord]:
        raise NotImplementedError

