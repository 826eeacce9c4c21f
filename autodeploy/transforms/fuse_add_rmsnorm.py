"""``fuse_add_rmsnorm``: the residual add feeding an RMSNorm joins it in one kernel; norms go to the backend.

Matches: ``torch_rmsnorm(add(a, b), w, eps, offset)`` where ``add`` is an ``aten.add.Tensor`` of two tensors of
the norm input's shape and dtype (the residual stream) and no ``out_dtype`` is asked. Emits
``torch_fused_add_rmsnorm(a, b, w, eps, offset) -> (normed, a + b)`` (or its Triton twin): the norm's users
read ``normed``, the add's other users read the sum. Every remaining ``torch_rmsnorm`` moves to the configured
backend.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.kernel_backends import kernel_op
from ..export.cleanup import same_shape
from .base import KernelBackendConfig, SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, is_op, node_val

aten = torch.ops.aten


def _residual_add(norm: Node) -> Node | None:
    add = norm.args[0]
    if not is_op(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args
    vals = [node_val(a), node_val(b), node_val(add)]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    if len({v.dtype for v in vals}) != 1 or not same_shape(vals[0], vals[1].shape):
        return None
    return add


@TransformRegistry.register("fuse_add_rmsnorm")
class FuseAddRMSNorm(Transform):
    preserves_node_values = True  # new nodes replace old ones; survivors compute what they did
    config_class = KernelBackendConfig

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        graph = gm.graph
        fused_op = kernel_op("torch_fused_add_rmsnorm", self.config.backend, ctx.device)
        norm_op = kernel_op("torch_rmsnorm", self.config.backend, ctx.device)
        fused = 0
        for norm in find_nodes(gm, torch.ops.autodeploy.torch_rmsnorm.default):
            weight, eps = norm.args[1], norm.args[2]
            offset = norm.args[3] if len(norm.args) > 3 else norm.kwargs.get("weight_offset", 0.0)
            out_dtype = norm.args[4] if len(norm.args) > 4 else norm.kwargs.get("out_dtype")
            add = _residual_add(norm)
            if add is None or out_dtype is not None:
                continue
            with graph.inserting_before(norm):
                both = graph.call_function(fused_op, (*add.args, weight, eps, offset))
                normed = graph.call_function(operator.getitem, (both, 0))
                total = graph.call_function(operator.getitem, (both, 1))
            normed.meta["val"], total.meta["val"] = norm.meta.get("val"), add.meta.get("val")
            norm.replace_all_uses_with(normed)
            graph.erase_node(norm)
            add.replace_all_uses_with(total)
            graph.erase_node(add)
            fused += 1
        swapped = 0
        if norm_op is not torch.ops.autodeploy.torch_rmsnorm.default:
            for node in find_nodes(gm, torch.ops.autodeploy.torch_rmsnorm.default):
                node.target = norm_op
                swapped += 1
        return TransformInfo(num_matches=fused + swapped, details={"fused_adds": fused, "backend_swapped": swapped})
