"""``shard_mlp``: carry out the MLP part of the sharding plan (``detect_sharding``).

For each planned MLP: the gate/up (or packed gate_up, or first) linears keep this rank's slice of the
intermediate features (column split; a packed gate_up keeps the matching gate rows and up rows), the down
linear keeps the matching input columns (row split) and its output is ``autodeploy::all_reduce``-d, with a bias
added once after the reduction. Emits nothing when there is no plan (a world of one).
"""

from __future__ import annotations

from torch.fx import GraphModule

from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .sharding import get_plan, nodes_by_name, rewrite_view, split_column, split_row


@TransformRegistry.register("shard_mlp")
class ShardMlp(Transform):
    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        plan = get_plan(gm)
        if plan is None or not plan.mlp:
            return TransformInfo(num_matches=0)
        nodes = nodes_by_name(gm)
        for mlp in plan.mlp:
            for split in mlp.columns:
                split_column(gm, nodes[split.node], split.ranges)
            for rewrite in mlp.views:
                rewrite_view(gm, rewrite)
            split_row(gm, nodes[mlp.row.node], mlp.row.ranges)
        return TransformInfo(num_matches=len(plan.mlp), details={"rank": plan.rank})
