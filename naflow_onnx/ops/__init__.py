"""The op registry: one record per ONNX op, the only place that knows what an op is.

A record holds the op's torch rebuild (``naflow_onnx/rebuild/``), its inverse rule
(``naflow_onnx/rules/``, or none) and its traits; every other module asks the functions below
(``keeps_layout(node)``, ``weight_inputs(node)``, ``rule_for(node)``, ...) instead of keeping its
own list of op types. Rules stay classes apart from where they apply: a record points to a rule,
``rules/backproject.py`` decides where it runs.

How to add an op (one place: ``naflow_onnx/ops/catalog.py``), e.g.::

    register("Selu", ew.selu, rule=PIECEWISE, role=LAYOUT, elementwise=True,
             samples=lambda: [Sample(X4), Sample(X4, attrs={"alpha": 1.2, "gamma": 0.5})])
    register("Foo", foo_v1, until=12)          # two opset ranges of one op: two records
    register("Foo", foo_v13, since=13)

1. write the torch function ``fn(node, inputs) -> tensor | list`` in the ``rebuild/`` family
   file (``node.attr(...)``, ``node.opset``; ``inputs`` are torch tensors, ``None`` if omitted);
2. give it ``samples``: small generated instances on which ``tests/test_rules.py`` compares the
   rebuild with onnxruntime and, if it has a rule, checks the rule's round trips (METHOD.md §8.2);
   if the op can lie on the data path between feature layers, give it a rule: an instance of an
   ``InverseRule`` subclass from ``rules/`` (write a new class only for new maths);
3. state its traits (see ``OpRecord``); an op whose output keeps its input's N×C×H×W meaning
   (``role=LAYOUT``) must have a rule (a test walks the registry);
4. regenerate README's "Supported ops" table: ``python -m naflow_onnx.ops`` prints it.

Records are keyed by (domain, op type, opset range): one op may have several records for
disjoint opset ranges (``since``/``until``); registering an overlapping range twice is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import UnsupportedOpError

if TYPE_CHECKING:
    from ..rules import InverseRule

# data-path roles
FEATURE = "feature"   # makes a feature map from any input (Conv, ConvTranspose)
LAYOUT = "layout"     # its output keeps its data inputs' N×C×H×W meaning (a feature map stays one)
OTHER = "other"       # anything else (reshapes, heads, shape arithmetic): the output is no feature map


@dataclass(frozen=True)
class Sample:
    """A generated instance of an op: ``tests/test_rules.py`` compares its torch rebuild with
    onnxruntime (every op) and checks its rule's round trips, METHOD.md §8.2 (ops with a rule).

    ``shapes``: the data inputs (random normal, drawn by the test); ``consts``: the other inputs,
    drawn from the generator it is given. ``check``: ``"injective"`` (inverse(forward(x)) == x,
    hence also forward(inverse(y)) == y), ``"range"`` (forward(inverse(y)) == y for y = forward(x')
    of a random x'), ``"selection"`` (a max: positive data A, y = forward(A);
    forward(inverse(y)) == y and inverse(y) is 0 off the selected positions) or ``"frozen"`` (a
    self-gated activation: the gate g(A) = forward(A)/A is frozen at the forward point A, so
    g(A)·inverse(y) == y for any y, and inverse(y) == 0 where g(A) = 0) or ``"point"``
    (statistics frozen at A, a normalisation layer: inverse(forward(A)) == A, and
    J·(inverse(y) − A) == y − forward(A) with J the rule's ``frozen_diagonal``)."""

    shapes: dict[str, tuple[int, ...]]
    consts: Callable | None = None               # torch.Generator -> {name: tensor}
    inputs: tuple[str, ...] | None = None        # node inputs in order (default: shapes then consts)
    attrs: dict = field(default_factory=dict)
    outputs: tuple[str, ...] = ("y",)
    opset: int = 17
    check: str = "injective"
    gate: str | None = None                      # the gate operand of a gated Mul
    known: tuple[str, ...] = ()                  # data operands held at their true value (a join)
    kind: str | None = None                      # the SolveRecord kind the rule must report
    scale: float = 1.0                           # the data's standard deviation
    tol: float = 1e-4
    label: str = ""


@dataclass(frozen=True)
class OpRecord:
    """Everything naflow knows about one op over an opset range."""

    op_type: str
    rebuild: Callable                            # torch function (node, inputs) -> tensor(s)
    rule: "InverseRule | None" = None            # its inverse on the data path, or none
    domain: str = ""
    since: int = 1                               # first opset, inclusive
    until: int | None = None                     # last opset, inclusive (None: open)
    role: str = OTHER                            # FEATURE, LAYOUT or OTHER
    weight_inputs: tuple[int, ...] = ()          # parameter input positions, the weight first
    elementwise: bool = False                    # one value per element: J is diagonal (linearize)
    join: bool = False                           # sums its data operands (a residual join)
    gate_source: bool = False                    # its output can gate a Mul (SE/CBAM/BAM)
    gate_path: bool = False                      # a gate may pass through it to the Mul it scales
    probability: bool = False                    # the target score is read under it (METHOD.md §2)
    shape_only: bool = False                     # the output is its input's values, reshaped
    scaled_copy: bool = False                    # with one data operand (the others constant): an
                                                 # element-wise affine copy of it (x/√2 in a GELU)
    fan_in: bool = False                         # element-wise join of several data tensors that
                                                 # the fan-in rule linearises (METHOD.md §5)
    freezable: bool = False                      # binary arithmetic that may hold one operand at its
                                                 # forward value (graph.frozen_operands)
    note: str = ""                               # README detail, e.g. "(constant weight)"
    samples: Callable[[], list[Sample]] | None = None

    def covers(self, opset: int | None) -> bool:
        return opset is None or (self.since <= opset and (self.until is None or opset <= self.until))


def _domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


class Registry:
    """Records keyed by (domain, op type), each a list of disjoint opset ranges."""

    def __init__(self):
        self._records: dict[tuple[str, str], list[OpRecord]] = {}

    def register(self, op_type: str, rebuild: Callable, **traits) -> OpRecord:
        traits["domain"] = _domain(traits.get("domain"))
        rec = OpRecord(op_type=op_type, rebuild=rebuild, **traits)
        if rec.role not in (FEATURE, LAYOUT, OTHER):
            raise ValueError(f"{op_type}: unknown role '{rec.role}'")
        same = self._records.setdefault((rec.domain, op_type), [])
        for old in same:
            hi_old = old.until if old.until is not None else float("inf")
            hi_new = rec.until if rec.until is not None else float("inf")
            if rec.since <= hi_old and old.since <= hi_new:
                raise ValueError(f"op {op_type} (domain '{rec.domain}') registered twice: opsets "
                                 f"{old.since}-{old.until or ''} and {rec.since}-{rec.until or ''}")
        same.append(rec)
        same.sort(key=lambda r: r.since)
        return rec

    def find(self, op_type: str, opset: int | None = None, domain: str = "") -> OpRecord | None:
        """The record for this op at ``opset`` (None: the newest record of the op), or None."""
        recs = [r for r in self._records.get((_domain(domain), op_type), []) if r.covers(opset)]
        return recs[-1] if recs else None

    def records(self) -> Iterator[OpRecord]:
        """Every record, in registration order."""
        for recs in self._records.values():
            yield from recs


REGISTRY = Registry()
register = REGISTRY.register


# ------------------------------------------------------------------------------------------------
# queries: take an op-type string, an onnx NodeProto or a RebuiltNode


def record(node, opset: int | None = None) -> OpRecord | None:
    if isinstance(node, str):
        return REGISTRY.find(node, opset)
    return REGISTRY.find(node.op_type, getattr(node, "opset", opset), getattr(node, "domain", ""))


def _trait(name: str) -> Callable[..., bool]:
    def query(node, opset: int | None = None) -> bool:
        rec = record(node, opset)
        return bool(rec is not None and getattr(rec, name))
    query.__name__ = name
    query.__doc__ = f"The record's ``{name}`` trait (False for an unregistered op)."
    return query


is_elementwise = _trait("elementwise")
is_join = _trait("join")
is_scaled_copy = _trait("scaled_copy")
is_freezable = _trait("freezable")
is_fan_in = _trait("fan_in")
is_gate_source = _trait("gate_source")
is_gate_path = _trait("gate_path")
is_probability = _trait("probability")
is_shape_only = _trait("shape_only")


def keeps_layout(node, opset: int | None = None) -> bool:
    rec = record(node, opset)
    return rec is not None and rec.role == LAYOUT


def makes_features(node, opset: int | None = None) -> bool:
    rec = record(node, opset)
    return rec is not None and rec.role == FEATURE


def weight_inputs(node, opset: int | None = None) -> tuple[int, ...]:
    """Positions of the op's parameter inputs (weight first, then bias), () if it has none."""
    rec = record(node, opset)
    return rec.weight_inputs if rec is not None else ()


def rule_for(node) -> "InverseRule":
    rec = record(node)
    if rec is None or rec.rule is None:
        raise UnsupportedOpError(f"no inverse rule for op {node.op_type} at {node.where()} "
                                 "(it lies on the data path between feature layers)")
    return rec.rule


def rebuild_fn(op_type: str, opset: int, domain: str = "") -> Callable | None:
    rec = REGISTRY.find(op_type, opset, domain)
    return rec.rebuild if rec is not None else None


# ------------------------------------------------------------------------------------------------
# README "Supported ops"

TABLE_BEGIN = "<!-- ops table: generated by `python -m naflow_onnx.ops`, do not edit -->"
TABLE_END = "<!-- /ops table -->"


def supported_ops_table() -> str:
    """README's "Supported ops" table: one row per inverse rule, then the rebuild-only ops."""
    rows: dict[str, list[str]] = {}   # rule summary -> ops, in registration order
    rebuild_only: list[str] = []
    seen: set[tuple[str, str]] = set()
    for rec in REGISTRY.records():
        if (rec.domain, rec.op_type) in seen:
            continue  # several opset ranges: one entry
        seen.add((rec.domain, rec.op_type))
        label = rec.op_type + (f" {rec.note}" if rec.note else "")
        if rec.rule is None:
            rebuild_only.append(label)
        else:
            rows.setdefault(rec.rule.summary, []).append(label)
    lines = [TABLE_BEGIN, "| inverse rule | ops |", "| --- | --- |"]
    lines += [f"| {summary} | {', '.join(ops)} |" for summary, ops in rows.items()]
    lines.append(f"| none: rebuilt only (heads, shape arithmetic, gate branches) | "
                 f"{', '.join(rebuild_only)} |")
    lines.append(TABLE_END)
    return "\n".join(lines)


from . import catalog  # noqa: E402,F401  (fills REGISTRY)
