"""``fuse_all_reduce_rmsnorm``: a row-parallel block's all-reduce joins the residual add and RMSNorm after it.

Matches: a fused add + RMSNorm (``torch_fused_add_rmsnorm`` or its Triton twin, from ``fuse_add_rmsnorm``) one
of whose two summands is an ``autodeploy::all_reduce`` read by nothing else. Emits
``autodeploy::all_reduce_add_rmsnorm(partial, other, weight, eps, weight_offset)`` with the same two outputs.
Sharding inserts the all-reduces, so only tensor-parallel graphs change: twice a layer (after o_proj and
after the MLP or MoE), plus the final norm.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..distributed import fused_all_reduce  # noqa: F401  (registers autodeploy::all_reduce_add_rmsnorm)
from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import is_op

ops = torch.ops.autodeploy


def _add_rmsnorm_ops() -> list:
    names = ("torch_fused_add_rmsnorm", "triton_fused_add_rmsnorm")
    return [getattr(ops, name).default for name in names if hasattr(ops, name)]


@TransformRegistry.register("fuse_all_reduce_rmsnorm")
class FuseAllReduceRMSNorm(Transform):
    preserves_node_values = True  # the fused op returns what the add + norm returned

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        targets = _add_rmsnorm_ops()
        fused = 0
        for node in list(gm.graph.nodes):
            if not is_op(node, targets):
                continue
            a, b, *rest = node.args
            for partial, other in ((a, b), (b, a)):
                if is_op(partial, ops.all_reduce.default) and len(partial.users) == 1:
                    node.target = ops.all_reduce_add_rmsnorm.default
                    node.args = (partial.args[0], other, *rest)
                    gm.graph.erase_node(partial)
                    fused += 1
                    break
        return TransformInfo(num_matches=fused, details={"fused_all_reduces": fused})
