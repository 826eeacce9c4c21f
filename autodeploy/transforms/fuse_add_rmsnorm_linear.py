"""``fuse_add_rmsnorm_linear``: a residual add + RMSNorm and the first linear that reads its output become one op.

Matches: ``triton_fused_add_rmsnorm`` whose normalised output feeds (directly, or through a ``view``/``reshape`` to
``[-1, H]``) a ``triton_linear`` or a dense ``triton_linear_glu`` (so this runs after ``gemv_linears`` and
``fuse_glu_linear``) of at most ``max_out_features`` weight rows. Emits ``triton_add_rmsnorm_linear``
(``custom_ops/triton/norm_linear.py``) in the norm's place; its normalised row and sum replace the norm's for every
other reader (the MoE experts beside the router, the next layer's add). At one token the GEMV normalises the row in
its prologue: one launch fewer. The torch backend has no such nodes, so the graph is left alone there.

Every program of the GEMV reads the whole row three times (``x``, the residual, the norm weight) to form its
statistics, so the fusion pays only where programs are few: a router. On an H100 (run 33) fusing every norm cost
Llama-3.1-8B's batch-1 decode 0.76 ms a token (its gate/up GEMV runs 14,336 programs: about 350 MB of extra L2
reads beside 235 MB of weights) and the Qwen3-30B-A3B engine about 0.05 ms; hence the default
``max_out_features`` of 512.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .base import SharedContext, Transform, TransformConfig, TransformInfo, TransformRegistry
from .graph import find_nodes, get_attr_value, is_op, node_val

ops = torch.ops.autodeploy
aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default)


def _outputs(norm: Node) -> tuple[Node | None, Node | None] | None:
    outs = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
    return (outs.get(0), outs.get(1)) if len(outs) == len(norm.users) else None


def _linear_of(normed: Node) -> tuple[Node, Node | None] | None:
    """The first linear reading ``normed`` (and the flattening view between them, if any)."""
    val = node_val(normed)
    if val is None:
        return None
    found = []
    for user in normed.users:
        if is_op(user, VIEWS) and user.args[0] is normed and list(user.args[1]) == [-1, val.shape[-1]]:
            found += [(linear, user) for linear in user.users if _is_linear(linear, user)]
        elif _is_linear(user, normed):
            found.append((user, None))
    order = {node: i for i, node in enumerate(normed.graph.nodes)}
    return min(found, key=lambda pair: order[pair[0]], default=None)


def _is_linear(node: Node, x: Node) -> bool:
    if node.target == ops.triton_linear.default:
        return node.args[0] is x and not node.kwargs
    return node.target == ops.triton_linear_glu.default and node.args[0] is x and node.args[5] == "dense"


def _arguments(linear: Node) -> tuple[Node, Node | None, str | None]:
    """(weight, bias, glu activation) of the linear."""
    if linear.target == ops.triton_linear.default:
        return linear.args[1], linear.args[2] if len(linear.args) > 2 else None, None
    return linear.args[1], linear.args[4], linear.args[7]


class FuseAddRmsNormLinearConfig(TransformConfig):
    max_out_features: int = 512  # the linear's weight rows: a router's 8-256 qualify, a projection's thousands not


@TransformRegistry.register("fuse_add_rmsnorm_linear")
class FuseAddRmsNormLinear(Transform):
    config_class = FuseAddRmsNormLinearConfig
    requires_shape_prop = False  # runs after the cache inputs exist; the new nodes take the values they replace

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        if not hasattr(ops, "triton_fused_add_rmsnorm") or not hasattr(ops, "triton_linear"):
            return TransformInfo(num_matches=0)
        from ..custom_ops.triton import norm_linear  # noqa: F401  (registers autodeploy::triton_add_rmsnorm_linear)

        graph, fused = gm.graph, 0
        for norm in find_nodes(gm, ops.triton_fused_add_rmsnorm.default):
            outs = _outputs(norm)
            if outs is None or outs[0] is None:
                continue
            normed, summed = outs
            found = _linear_of(normed)
            if found is None:
                continue
            linear, view = found
            weight, bias, activation = _arguments(linear)
            params = [attr for attr in (weight, bias) if attr is not None]
            if not all(isinstance(attr, Node) and attr.op == "get_attr" for attr in params):
                continue
            if get_attr_value(gm, weight).shape[0] > self.config.max_out_features:
                continue
            for attr in params:  # parameters created after the norm (fused linears) move ahead of it
                norm.prepend(attr)
            x, residual, norm_weight, eps = norm.args[:4]
            offset = norm.args[4] if len(norm.args) > 4 else norm.kwargs.get("weight_offset", 0.0)
            with graph.inserting_before(norm):
                new = graph.call_function(ops.triton_add_rmsnorm_linear.default,
                                          (x, residual, norm_weight, eps, offset, weight, bias, activation))
                y, new_normed, new_summed = (graph.call_function(operator.getitem, (new, i)) for i in range(3))
            out = node_val(linear)
            y_val = out.new_empty((*node_val(normed).shape[:-1], out.shape[-1])) if view is not None else out
            new.meta["val"] = (y_val, node_val(normed), node_val(summed) if summed is not None else None)
            for node, value in zip((y, new_normed, new_summed), new.meta["val"]):
                node.meta["val"] = value
            if view is not None:  # the linear read [-1, H]: its output is [-1, N]
                with graph.inserting_after(y):
                    y_flat = graph.call_function(aten.reshape.default, (y, [-1, out.shape[-1]]))
                y_flat.meta.update(linear.meta)
                linear.replace_all_uses_with(y_flat)
            else:
                linear.replace_all_uses_with(y)
            graph.erase_node(linear)
            if view is not None and not view.users:
                graph.erase_node(view)
            normed.replace_all_uses_with(new_normed)
            if summed is not None:
                summed.replace_all_uses_with(new_summed)
            for node in (normed, summed, norm):
                if node is not None and not node.users:
                    graph.erase_node(node)
            fused += 1
        return TransformInfo(num_matches=fused)
