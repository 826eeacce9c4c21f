"""``match_attention``: attention written without our attention interface becomes ``autodeploy::torch_attention``.

Matches (patterns in ``patterns/attention.py``): ``aten.scaled_dot_product_attention`` with a causal mask or
``is_causal=True`` (explicit or default scale, ``enable_gqa``); the eager form ``softmax(q k^T * scale + mask) v``
with ``mul``/``div``/no scale, optional soft-cap, added or ``masked_fill`` masks and the casts models insert around
a float32 softmax; gpt-oss sinks; BLOOM's ALiBi ``baddbmm``. ``repeat_kv`` on K/V is folded into grouped-query
attention. The mask (and an ALiBi bias) is classified by evaluating the subgraph that computes it
(``patterns/attention_masks.py``): causal, or causal with a sliding window; anything else is left alone and the
reason recorded in ``details["rejected"]``.

Emits one ``torch_attention`` per matched layer (``bsnd``; scale, sliding_window, logit_cap, sinks, alibi_slopes
filled in), then drops the no-ops it leaves (the model's ``[B, N, S, D]`` transposes cancel against ours).

Attention routed at export is ``torch_attention`` already, with the model's own mask as its trailing ``mask``
argument: that mask is classified the same way and folded into ``sliding_window`` / ``chunk_size``
(``details["masks_folded"]``); one that is not causal (windowed, chunked) stays, with the reason in
``details["rejected"]``, and ``insert_cached_attention`` then refuses the graph.

Works on graphs exported on the meta device too (one-element constants not loaded yet are probed with two values).
Limits: self-attention without a KV cache only (q, k, v of one length); masks that read weights, token ids or
tensors not loaded yet, padding/chunked/document masks, biases other than ALiBi and windows longer than the
probe limit (``attention_masks.MAX_PROBE_LEN``) are not matched; a ``repeat_kv`` written another way than
``unsqueeze -> expand -> reshape`` or ``repeat_interleave`` stays (as multi-head attention over repeated K/V).
What was left unmatched is listed in ``details["unmatched"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..export.cleanup import remove_noop_ops
from ..patterns.attention import ATTENTION_GROUPS, fold_attention_masks, fold_repeat_kv
from ..patterns.attention_masks import forget_probes
from .base import SharedContext, TransformInfo, TransformRegistry
from .graph import find_nodes, node_val, run_shape_prop
from .pattern_transform import PatternTransform

aten = torch.ops.aten
_MATMULS = (aten.matmul.default, aten.bmm.default)
_ANCHORS = (aten.scaled_dot_product_attention.default, aten.softmax.int, aten._softmax.default)


def _canonical_dims(gm: GraphModule) -> dict[Node, tuple[Any, ...]]:
    """Write ``transpose`` dims as ``(lo, hi) >= 0`` and a last-dim ``softmax`` as ``-1``, as the patterns are.

    Returns the original arguments of the nodes changed, for ``_restore``.
    """
    changed: dict[Node, tuple[Any, ...]] = {}
    for node in find_nodes(gm, [aten.transpose.int, aten.softmax.int]):
        val = node_val(node.args[0])
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        rank = val.dim()
        if node.target == aten.transpose.int:
            dims = sorted(d % rank for d in node.args[1:3])
            new_args = (node.args[0], *dims)
        else:
            new_args = (node.args[0], -1 if node.args[1] % rank == rank - 1 else node.args[1], *node.args[2:])
        if new_args != tuple(node.args):
            changed[node] = tuple(node.args)
            node.args = new_args
    return changed


def _restore(gm: GraphModule, original: dict[Node, tuple[Any, ...]]) -> None:
    live = set(gm.graph.nodes)
    for node, args in original.items():
        if node in live:
            node.args = args


def _unmatched(gm: GraphModule) -> list[str]:
    """SDPA nodes, and softmaxes whose result reaches a matmul, that are still in the graph."""
    left = [n.name for n in find_nodes(gm, aten.scaled_dot_product_attention.default)]
    for node in find_nodes(gm, aten.softmax.int):
        users = list(node.users) + [u for user in node.users for u in user.users]
        if any(u.target in _MATMULS for u in users):
            left.append(node.name)
    return left


@TransformRegistry.register("match_attention")
class MatchAttention(PatternTransform):
    pattern_groups = ATTENTION_GROUPS

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        try:
            masks_folded, masks_rejected = fold_attention_masks(gm)
        finally:
            forget_probes(gm)
        if masks_folded:
            gm.graph.eliminate_dead_code()
        if not find_nodes(gm, _ANCHORS):  # attention already routed at export: skip tracing the patterns
            details: dict[str, Any] = {"note": "no SDPA or softmax left in the graph", "masks_folded": masks_folded}
            if masks_rejected:
                details["rejected"] = masks_rejected
            return TransformInfo(num_matches=masks_folded, details=details)
        patterns = self.pattern_set()
        original = _canonical_dims(gm)
        try:
            num_matches = patterns.apply(gm)
        finally:
            _restore(gm, original)
            forget_probes(gm)
        live = set(gm.graph.nodes)
        rejected = {n.name: f"{name}: {why}" for n, (name, why) in patterns.rejections.items() if n in live}
        details: dict[str, Any] = {"matches_by_pattern": dict(patterns.matches_by_pattern)}
        if masks_folded:
            details["masks_folded"] = masks_folded
        rejected.update(masks_rejected)
        if num_matches:
            gm.graph.eliminate_dead_code()
            run_shape_prop(gm)
            details["grouped_query_folded"] = fold_repeat_kv(gm)
            details["noops_removed"] = remove_noop_ops(gm)
        if rejected:
            details["rejected"] = rejected
        unmatched = _unmatched(gm)
        if unmatched:
            details["unmatched"] = unmatched
        return TransformInfo(num_matches=num_matches + masks_folded, details=details)
