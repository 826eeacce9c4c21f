"""``fuse_moe_sum_rmsnorm``: the fused MoE's top-k sum moves into the residual add + RMSNorm that reads its output.

Matches: ``triton_fused_add_rmsnorm`` one of whose two inputs is a ``triton_moe`` output (directly or through
views and reshapes that feed nothing else), which is every MoE layer of a decoder without tensor parallelism: the
next layer's input norm, or the final norm after the last layer. Emits ``triton_moe_rows`` (the experts, their
weighted rows left unsummed) and ``triton_moe_sum_add_rmsnorm`` (the sum, the add and the norm in one launch;
``custom_ops/triton/moe_sum_rmsnorm.py``) with the same values: one launch fewer per layer. After ``shard_moe``
an all-reduce sits between the two and nothing matches. The torch backend has no such nodes.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, get_attr_value, is_op, node_val

ops = torch.ops.autodeploy
aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _norm_reading(moe: Node) -> tuple[Node, int, list[Node]] | None:
    """(the add + RMSNorm reading ``moe``, the argument position it reads it at, the views between them)."""
    chain, node = [], moe
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target == ops.triton_fused_add_rmsnorm.default:
            positions = [i for i in (0, 1) if user.args[i] is node]
            return (user, positions[0], chain) if len(positions) == 1 else None
        if not (is_op(user, VIEWS) and user.args[0] is node):
            return None
        chain.append(user)
        node = user
    return None


def _num_experts(gm: GraphModule, w_up: Node) -> int | None:
    val = node_val(w_up)
    if val is None and isinstance(w_up, Node) and w_up.op == "get_attr":
        val = get_attr_value(gm, w_up)
    return None if val is None else int(val.shape[0])


@TransformRegistry.register("fuse_moe_sum_rmsnorm")
class FuseMoeSumRmsNorm(Transform):
    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        if not hasattr(ops, "triton_moe"):
            return TransformInfo(num_matches=0)
        from ..custom_ops.triton import moe_sum_rmsnorm  # noqa: F401  (registers the two ops)

        graph, fused = gm.graph, 0
        for moe in find_nodes(gm, ops.triton_moe.default):
            found = _norm_reading(moe)
            experts = _num_experts(gm, moe.args[3]) if len(moe.args) > 3 else None
            if found is None or experts is None:
                continue
            norm, position, views = found
            residual = norm.args[1 - position]
            weight, eps = norm.args[2], norm.args[3]
            offset = norm.args[4] if len(norm.args) > 4 else norm.kwargs.get("weight_offset", 0.0)
            with graph.inserting_before(norm):
                rows = graph.call_function(ops.triton_moe_rows.default, moe.args, moe.kwargs)
                new = graph.call_function(ops.triton_moe_sum_add_rmsnorm.default,
                                          (rows, moe.args[1], experts, residual, weight, eps, offset))
            norm.replace_all_uses_with(new)
            for node in (norm, *reversed(views), moe):
                graph.erase_node(node)
            fused += 1
        return TransformInfo(num_matches=fused)
