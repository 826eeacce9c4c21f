"""``shard_attention``: carry out the attention part of the sharding plan (``detect_sharding``).

For each planned attention layer: the q/k/v linears keep this rank's heads (weight rows and bias entries), the
``view``/``reshape`` literals on their paths become local head counts, per-head parameters of the op (sinks,
ALiBi slopes) are sliced, and o_proj keeps the matching input columns; its output is ``autodeploy::all_reduce``-d
(a bias is added after the reduction, once). The attention op then sees local heads, so the KV cache that
``insert_cached_attention`` sizes from it holds only this rank's KV heads.
Emits nothing when there is no plan (a world of one).
"""

from __future__ import annotations

from torch.fx import GraphModule

from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .sharding import get_plan, nodes_by_name, rewrite_view, shard_parameter, split_column, split_row


@TransformRegistry.register("shard_attention")
class ShardAttention(Transform):
    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        plan = get_plan(gm)
        if plan is None or not plan.attention:
            return TransformInfo(num_matches=0)
        nodes = nodes_by_name(gm)
        views = 0
        for layer in plan.attention:
            for split in layer.columns:
                split_column(gm, nodes[split.node], split.ranges)
            for rewrite in layer.views:
                views += rewrite_view(gm, rewrite)
            for param in layer.head_params:
                shard_parameter(gm, param)
            split_row(gm, nodes[layer.row.node], layer.row.ranges)
        first = plan.attention[0]
        return TransformInfo(
            num_matches=len(plan.attention),
            details={"heads": first.heads, "views_rewritten": views, "rank": plan.rank},
        )
