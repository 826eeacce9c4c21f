"""``shard_moe``: carry out the mixture-of-experts part of the sharding plan (``detect_sharding``).

Expert mode: each rank keeps ``E / N`` experts' weights and biases, and the routed expert ids reaching
``torch_moe`` are shifted by ``-rank * E / N``, so experts of other ranks fall outside ``[0, E / N)`` and
contribute nothing (the op's documented sentinel rule; fused MoE backends must keep it). Tensor mode: every
expert keeps a slice of its intermediate size (gate and up rows, or interleaved pairs; the matching down
columns), and only rank 0 adds the down bias. Either way the op's output is ``autodeploy::all_reduce``-d.
The router stays replicated. Emits nothing when there is no plan (a world of one).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .sharding import ALL_REDUCE, get_plan, insert_after, nodes_by_name, shard_parameter

aten = torch.ops.aten


@TransformRegistry.register("shard_moe")
class ShardMoe(Transform):
    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        plan = get_plan(gm)
        if plan is None or not plan.moe:
            return TransformInfo(num_matches=0)
        nodes = nodes_by_name(gm)
        for layer in plan.moe:
            moe = nodes[layer.node]
            for param in layer.params:
                shard_parameter(gm, param)
            if layer.mode == "expert" and layer.id_offset:
                ids = moe.args[1]
                with gm.graph.inserting_before(moe):
                    local_ids = gm.graph.call_function(aten.sub.Tensor, (ids, layer.id_offset))
                moe.replace_input_with(ids, local_ids)
            insert_after(gm, moe, ALL_REDUCE)
        return TransformInfo(num_matches=len(plan.moe), details={"mode": plan.moe[0].mode, "rank": plan.rank})
