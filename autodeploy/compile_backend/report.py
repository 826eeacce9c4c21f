"""What the backend did to each graph Dynamo handed it: ``GraphReport``, kept per process and per backend.

``autodeploy.compile_backend.last_report()`` is the report of the last graph compiled (a recompile is a new
graph), ``reports()`` all of them (the last ``MAX_REPORTS``); an ``AutoDeployBackend`` instance passed as
``backend=`` keeps its own in ``.reports``. A report holds no tensors: the transforms' ``TransformInfo``, the op
counts of the graph before and after them, timings and the transformed graph's code.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from ..transforms.base import TransformInfo

MAX_REPORTS = 256
_REPORTS: deque[GraphReport] = deque(maxlen=MAX_REPORTS)
_INDEX = itertools.count()


def op_counts(gm: GraphModule) -> Counter[str]:
    """``{"aten.linear.default": 15, "autodeploy.torch_rmsnorm.default": 5, ...}`` over call_function nodes."""
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counts[op_name(node.target)] += 1
    return counts


def op_name(target: Any) -> str:
    """``aten.linear.default`` for an op overload, ``aten.linear`` for a packet, ``getitem`` for a function."""
    if hasattr(target, "overloadpacket") or hasattr(target, "overloads"):
        return str(target)
    return getattr(target, "__name__", None) or str(target)


@dataclass
class GraphReport:
    """One compiled graph."""

    index: int
    compile_id: str | None
    backend: str  # "inductor", "eager" or "cudagraphs"
    inputs: list[str]  # name: shape of each argument the graph still takes
    num_weights: int  # parameters/buffers frozen into the graph as get_attr
    transforms: list[TransformInfo]
    ops_before: Counter[str]
    ops_after: Counter[str]
    lowering_s: float = 0.0
    transforms_s: float = 0.0
    backend_compile_s: float = 0.0
    code: str = field(default="", repr=False)
    #: calls that ran Dynamo's graph because they came with other weights (see ``backend._runner``)
    fallback_calls: int = 0

    @property
    def matches(self) -> dict[str, int]:
        """``{transform name: matches}`` of the transforms that ran."""
        return {t.name: t.num_matches for t in self.transforms if not t.skipped}

    def count(self, op: Any) -> int:
        """Nodes calling ``op`` (an op overload/packet or its name, ``"autodeploy.torch_rope"``) after the transforms."""
        name = op if isinstance(op, str) else op_name(op)
        return sum(n for key, n in self.ops_after.items() if key == name or key.rsplit(".", 1)[0] == name)

    def autodeploy_ops(self) -> dict[str, int]:
        return {k: v for k, v in self.ops_after.items() if k.startswith("autodeploy.")}

    def summary(self) -> str:
        head = (
            f"graph {self.index} (compile id {self.compile_id}) -> {self.backend}: {len(self.inputs)} inputs, "
            f"{self.num_weights} weights; lower {self.lowering_s:.2f}s, transforms {self.transforms_s:.2f}s, "
            f"{self.backend} {self.backend_compile_s:.2f}s"
        )
        rows = [f"  {t.name:<28} {'skipped' if t.skipped else f'{t.num_matches:>4} matches'}" for t in self.transforms]
        ops = ", ".join(f"{k.removeprefix('autodeploy.')}={v}" for k, v in sorted(self.autodeploy_ops().items()))
        return "\n".join([head, *rows, f"  autodeploy ops: {ops or 'none'}"])

    def __str__(self) -> str:
        return self.summary()


def record(report: GraphReport) -> None:
    _REPORTS.append(report)


def next_index() -> int:
    return next(_INDEX)


def reports() -> list[GraphReport]:
    """Reports of the graphs compiled in this process, oldest first (the last ``MAX_REPORTS``)."""
    return list(_REPORTS)


def last_report() -> GraphReport | None:
    return _REPORTS[-1] if _REPORTS else None


def clear_reports() -> None:
    _REPORTS.clear()
