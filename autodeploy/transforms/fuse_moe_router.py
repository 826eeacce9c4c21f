"""``fuse_moe_router``: a softmax top-k router becomes one ``moe_router`` op on the chosen kernel backend.

Matches: ``topk(softmax(logits, -1), k)`` (largest first, last dim) whose softmax is float32 and feeds nothing
else, with the optional renormalisation ``values / values.sum(-1, keepdim=True)`` (Mixtral; Qwen-MoE with
``norm_topk_prob``), and the cast of the weights to the model dtype that HF applies before the experts (when it is
all they feed). Emits ``triton_moe_router(logits, k, normalize, dtype)`` (``custom_ops/triton/moe_router.py``: one
launch instead of softmax, top-k, sum, divide and cast) whose weights and ids replace the values (or their
renormalised, cast form) and indices. On ``torch`` (``auto`` without CUDA) the graph is left alone.

Limits: a 16-bit softmax (a bf16 Mixtral's router) is kept: its rounded probabilities tie often, and which of
tied experts ``torch.topk`` returns is not specified, so the swap could change the experts a token gets.
Sigmoid or grouped routers (DeepSeek) and top-k-then-softmax (gpt-oss) are not matched.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.kernel_backends import kernel_op
from .base import KernelBackendConfig, SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, is_op, node_val

aten = torch.ops.aten
SOFTMAX = (aten.softmax.int, aten._softmax.default)
CASTS = (aten.to.dtype, aten._to_copy.default)


def _last_dim(dim: int, node: Node) -> bool:
    val = node_val(node)
    return dim == -1 or (val is not None and dim == val.dim() - 1)


def _router(topk: Node) -> tuple[Node, int, Node | None, Node | None, Node | None] | None:
    """``(logits, k, values, indices, normalised)`` of a matching ``topk``, or ``None``."""
    args = list(topk.args) + [None] * (5 - len(topk.args))
    softmax, k, dim, largest, _ = args
    dim = topk.kwargs.get("dim", -1 if dim is None else dim)
    largest = topk.kwargs.get("largest", True if largest is None else largest)
    if not (isinstance(softmax, Node) and is_op(softmax, SOFTMAX) and isinstance(k, int) and largest):
        return None
    val = node_val(softmax)
    if len(softmax.users) != 1 or val is None or val.dtype != torch.float32:
        return None
    if not (_last_dim(dim, softmax) and _last_dim(softmax.args[1], softmax.args[0])):
        return None
    outs = {user.args[1]: user for user in topk.users if user.target is operator.getitem}
    if len(outs) != len(topk.users):
        return None
    values, indices = outs.get(0), outs.get(1)
    return softmax.args[0], k, values, indices, _renormalised(values)


def _renormalised(values: Node | None) -> Node | None:
    """The ``values / values.sum(-1, keepdim=True)`` node when that is all ``values`` feeds."""
    if values is None or len(values.users) != 2:
        return None
    total = next((u for u in values.users if is_op(u, aten.sum.dim_IntList)), None)
    div = next((u for u in values.users if is_op(u, (aten.div.Tensor, aten.div_.Tensor))), None)
    if total is None or div is None or div.args != (values, total) or len(total.users) != 1:
        return None
    dims, keepdim = total.args[1], total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)
    last = [-1, getattr(node_val(values), "ndim", 0) - 1]
    return div if keepdim and len(dims) == 1 and dims[0] in last else None


def _cast(weights: Node | None) -> Node | None:
    """The dtype cast that is all the router's weights feed (same device and layout), or ``None``."""
    if weights is None or len(weights.users) != 1:
        return None
    cast = next(iter(weights.users))
    if not is_op(cast, CASTS) or cast.args[0] is not weights:
        return None
    src, out = node_val(weights), node_val(cast)
    if src is None or out is None or out.device != src.device or out.shape != src.shape:
        return None
    return cast if out.dtype in (torch.float32, torch.bfloat16, torch.float16) else None


@TransformRegistry.register("fuse_moe_router")
class FuseMoeRouter(Transform):
    config_class = KernelBackendConfig

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        op = kernel_op("torch_moe_router", self.config.backend, ctx.device)
        if op is torch.ops.autodeploy.torch_moe_router.default:
            return TransformInfo(num_matches=0, details={"backend": "torch"})
        graph, fused, normalised, casts = gm.graph, 0, 0, 0
        for topk in find_nodes(gm, aten.topk.default):
            found = _router(topk)
            if found is None:
                continue
            logits, k, values, indices, renorm = found
            cast = _cast(renorm if renorm is not None else values)
            dtype = node_val(cast).dtype if cast is not None else torch.float32
            with graph.inserting_before(topk):
                router = graph.call_function(op, (logits, k, renorm is not None, dtype))
                weights = graph.call_function(operator.getitem, (router, 0))
                ids = graph.call_function(operator.getitem, (router, 1))
            if indices is not None:
                indices.replace_all_uses_with(ids)
            if cast is not None:
                cast.replace_all_uses_with(weights)
                casts += 1
            elif renorm is not None:
                renorm.replace_all_uses_with(weights)
            elif values is not None:
                values.replace_all_uses_with(weights)
            normalised += renorm is not None
            softmax = topk.args[0]
            total = renorm.args[1] if renorm is not None else None
            for node in (cast, renorm, total, values, indices, topk, softmax):
                if node is not None and not node.users:
                    graph.erase_node(node)
            fused += 1
        details = {"backend": "triton", "renormalised": normalised, "casts": casts}
        return TransformInfo(num_matches=fused, details=details)
