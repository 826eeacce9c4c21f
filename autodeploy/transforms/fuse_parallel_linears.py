"""``fuse_parallel_linears``: linears that read the same input become one GEMM.

Matches: two or more ``aten.linear`` nodes with the same input tensor and ``get_attr`` weights (and biases) of
one dtype — q/k/v projections, gate/up projections, MoE router + shared-expert projections. Emits one
``aten.linear`` over the concatenated weight (missing biases filled with zeros when some have one), and an
``aten.split_with_sizes`` on the last dim whose pieces replace the old outputs. The old parameters are dropped.
Limits: weights must be loaded (runs in the fusion stage, after ``load_weights``); quantized linears (custom
ops) are not touched.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import add_parameter, drop_unused_attributes, find_nodes, get_attr_value

aten = torch.ops.aten


def _bias_node(linear: Node) -> Node | None:
    if len(linear.args) > 2:
        return linear.args[2]
    return linear.kwargs.get("bias")


def _fusable(gm: GraphModule, linear: Node) -> bool:
    weight, bias = linear.args[1], _bias_node(linear)
    if not isinstance(weight, Node) or weight.op != "get_attr":
        return False
    if bias is not None and (not isinstance(bias, Node) or bias.op != "get_attr"):
        return False
    return not get_attr_value(gm, weight).is_meta


def _fuse_group(gm: GraphModule, linears: list[Node]) -> None:
    graph = gm.graph
    weights = [get_attr_value(gm, n.args[1]) for n in linears]
    biases = [get_attr_value(gm, b) if (b := _bias_node(n)) is not None else None for n in linears]
    sizes = [w.shape[0] for w in weights]
    fused_weight = torch.cat([w.detach() for w in weights], dim=0)
    fused_bias = None
    if any(b is not None for b in biases):
        fused_bias = torch.cat(
            [b.detach() if b is not None else torch.zeros(s, dtype=fused_weight.dtype, device=fused_weight.device)
             for b, s in zip(biases, sizes)]
        )
    x = linears[0].args[0]
    with graph.inserting_before(linears[0]):  # the group is in graph order
        weight_node = graph.get_attr(add_parameter(gm, "fused_linear_weight", fused_weight))
        bias_node = graph.get_attr(add_parameter(gm, "fused_linear_bias", fused_bias)) if fused_bias is not None else None
        fused = graph.call_function(aten.linear.default, (x, weight_node, bias_node))
        split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(linears))]
    fused.meta["autodeploy_fused_sizes"] = sizes
    for linear, piece in zip(linears, pieces):
        piece.meta.update({k: v for k, v in linear.meta.items() if k != "val"})
        linear.replace_all_uses_with(piece)
        graph.erase_node(linear)


def _node_order(gm: GraphModule) -> dict[Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


@TransformRegistry.register("fuse_parallel_linears")
class FuseParallelLinears(Transform):
    preserves_node_values = True  # new nodes replace old ones; survivors compute what they did

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        groups: dict[Node, list[Node]] = defaultdict(list)
        for node in find_nodes(gm, aten.linear.default):
            if _fusable(gm, node):
                groups[node.args[0]].append(node)
        fused = []
        for linears in groups.values():
            dtypes = {get_attr_value(gm, n.args[1]).dtype for n in linears}
            if len(linears) < 2 or len(dtypes) != 1:
                continue
            order = _node_order(gm)
            linears.sort(key=order.__getitem__)
            fused.append([get_attr_value(gm, n.args[1]).shape[0] for n in linears])
            _fuse_group(gm, linears)
        if fused:
            gm.graph.eliminate_dead_code()
            drop_unused_attributes(gm)
        return TransformInfo(num_matches=len(fused), details={"group_sizes": fused[:4]})
