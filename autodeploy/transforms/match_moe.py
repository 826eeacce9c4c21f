"""``match_moe``: transformers' grouped-mm experts become ``autodeploy::torch_moe``.

With the default ``route_experts`` export patch the experts are already ``torch_moe`` and this finds nothing.
With it off (or for a model the patch cannot route), each MoE block's experts export as transformers'
``grouped_mm_experts_forward``; this matches that subgraph (patterns in ``patterns/moe.py``: any combination of
``is_transposed``, ``has_bias``, gated or not, every activation of ``custom_ops.activation`` and gpt-oss's clamped
gate, with either grouped matmul op and either histogram form). Only the pattern groups of the layouts the graph's
grouped matmuls show are traced, so dense models pay nothing.

Emits ``torch_moe(hidden [T, H], top_k_ids [T, K], top_k_weights [T, K], w_up, w_down, b_up, b_down, activation,
gated, interleaved, limit, alpha)`` reading the model's stacked expert parameters (transposed views when
``is_transposed``); the router stays as the model wrote it. Afterwards it drops what the matched subgraph leaves:
an in-place ``clamp_`` on the sorted ids that nothing reads any more (with the sort feeding it) and a round trip
through float32 when the router's weights are float32 and the experts are not.

Limits (see ``patterns/moe.py``): clamped-SiLU gates, ``batched_mm``/``eager`` experts and hand-written experts
are not matched; grouped matmuls left in the graph are listed in ``details["unmatched"]``.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from ..patterns import PatternSet, pattern_set
from ..patterns.moe import ExpertsLayout
from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, is_op, node_val

aten = torch.ops.aten
MOE = torch.ops.autodeploy.torch_moe.default
_GROUPED_MMS = {  # the fallback is registered by transformers.integrations.moe (imported by patterns.moe)
    "mm_fallback": torch.ops.transformers.grouped_mm_fallback.default,
    "grouped_mm": aten._grouped_mm.default,
}
_CASTS = (aten.to.dtype, aten._to_copy.default)


def _layout(mm: Node) -> ExpertsLayout | None:
    """The layout of the experts a grouped matmul ``mm(rows, weight, cumsum(histc(ids)))`` belongs to."""
    kind = next(k for k, op in _GROUPED_MMS.items() if mm.target == op)
    offsets = mm.args[2]
    histc = offsets.args[0] if isinstance(offsets, Node) and is_op(offsets, aten.cumsum) else None
    if not (isinstance(histc, Node) and is_op(histc, aten.histc)):
        return None
    ids = node_val(histc.args[0])
    if not isinstance(ids, torch.Tensor):
        return None
    transposed = not is_op(mm.args[1], aten.transpose.int)  # [E, U, H] weights are transposed for the matmul
    bias = any(is_op(user, aten.add_.Tensor) for user in mm.users)
    histc_kind = "float_histc" if ids.is_floating_point() else "int_histc"
    return ExpertsLayout(kind, histc_kind, transposed, bias)


def _groups_in(gm: GraphModule) -> list[str]:
    """The pattern groups of the experts layouts in ``gm``, in graph order."""
    layouts = [_layout(mm) for mm in find_nodes(gm, list(_GROUPED_MMS.values()))]
    return list(dict.fromkeys(layout.group for layout in layouts if layout is not None))


def _returns_fresh_tensor(node: Node) -> bool:
    """``node`` returns a new tensor, not a view of another one."""
    index = 0
    if node.target is operator.getitem:
        node, index = node.args[0], node.args[1]
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or schema.is_mutable or index >= len(schema.returns):
        return False
    return schema.returns[index].alias_info is None


def _drop_dead_mutations(gm: GraphModule) -> int:
    """Erase in-place ops whose result nobody reads, on temporaries nothing else reads either."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or node.users or schema is None or not schema.is_mutable:
            continue
        written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        target = node.args[0] if node.args else None
        if [a.name for a in written] != [schema.arguments[0].name] or not isinstance(target, Node):
            continue
        if len(target.users) == 1 and _returns_fresh_tensor(target):
            gm.graph.erase_node(node)
            gm.graph.eliminate_dead_code()
            removed += 1
    return removed


def _fold_round_trip_casts(gm: GraphModule) -> int:
    """``torch_moe(...) -> float32 -> back to its dtype`` becomes ``torch_moe(...)`` (the cast up is exact)."""
    folded = 0
    for moe in find_nodes(gm, MOE):
        dtype = node_val(moe).dtype
        for up in [u for u in moe.users if is_op(u, _CASTS) and node_val(u).dtype == torch.float32]:
            for down in [d for d in up.users if is_op(d, _CASTS)]:
                if node_val(down).dtype == dtype and node_val(down).device == node_val(moe).device:
                    down.replace_all_uses_with(moe)
                    gm.graph.erase_node(down)
                    folded += 1
    gm.graph.eliminate_dead_code()
    return folded


@TransformRegistry.register("match_moe")
class MatchMoe(Transform):
    _patterns: ClassVar[dict[str, PatternSet]] = {}  # per group, traced once per process on first need

    @classmethod
    def pattern_set(cls, group: str) -> PatternSet:
        if group not in cls._patterns:
            patterns = pattern_set(group)
            patterns.match_meta = True
            patterns.match_across_mutations = True  # the experts mutate temporaries they create
            cls._patterns[group] = patterns
        return cls._patterns[group]

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        groups = _groups_in(gm)
        num_matches = 0
        details: dict[str, Any] = {"groups": groups, "matches_by_pattern": {}}
        rejected: dict[str, str] = {}
        for group in groups:
            patterns = self.pattern_set(group)
            found = patterns.apply(gm)
            num_matches += found
            details["matches_by_pattern"].update(patterns.matches_by_pattern)
            rejected.update(patterns.live_rejections(gm))
        if num_matches:
            gm.graph.eliminate_dead_code()
            details["dead_mutations_removed"] = _drop_dead_mutations(gm)
            details["casts_folded"] = _fold_round_trip_casts(gm)
        if rejected:
            details["rejected"] = rejected
        unmatched = [n.name for n in find_nodes(gm, list(_GROUPED_MMS.values()))]
        if unmatched:
            details["unmatched"] = unmatched
        return TransformInfo(num_matches=num_matches, details=details)
