"""``fuse_quant_linears``: quantized linears that read the same input become one quantized GEMM.

Matches: two or more calls of the same ``autodeploy::*_quant_{fp8,int8,int4}_linear`` op on the same input
whose weights, scales (and zero points, biases) are loaded ``get_attr`` parameters of one layout (for int4: one
group size, all with or all without zero points) — q/k/v and gate/up after ``quantize_*``. Every layout keeps
output channels N outermost, so fusing is a concatenation along N: fp8/int8 ``weight`` and ``weight_scale`` on
dim 0, int4 ``qweight`` on dim 0 and ``scales``/``qzeros`` ``[G, N]`` on dim 1 (per-tensor fp8 scales are
stored broadcast to ``[N]``, so they concatenate too; int4 ``qweight`` rows go back into the row tiles the
total takes, ``int4_cat_rows``). Emits the fused op and an ``aten.split_with_sizes`` on the last dim, the shape
``fuse_parallel_linears`` gives full-precision linears (so ``fuse_glu`` packs gate/up).
Limits: runs after ``load_weights`` (meta weights are skipped).
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.quant_linear import int4_cat_rows
from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import add_parameter, drop_unused_attributes, find_nodes, get_attr_value

aten = torch.ops.aten
ops = torch.ops.autodeploy

#: op name -> (dim of each tensor argument along which N runs, or None for non-tensor args), after ``x``
_LAYOUT_BY_FORMAT = {"fp8": (0, 0, 0), "int8": (0, 0, 0), "int4": (0, 1, 1, 0, None)}  # int4: q, scales, zeros, bias, g


def _layouts() -> dict:
    """Fusable op -> its layout, for the quantized-linear ops registered in this process (the Triton ones exist
    only where Triton does, and a graph can only hold registered ops)."""
    layouts = {}
    for backend in ("torch", "triton"):
        for fmt, dims in _LAYOUT_BY_FORMAT.items():
            packet = getattr(ops, f"{backend}_quant_{fmt}_linear", None)
            if packet is not None:
                layouts[packet.default] = dims
    return layouts


def _dims(target) -> tuple:
    """The layout of one quantized-linear op (``autodeploy::<backend>_quant_<format>_linear``)."""
    return _LAYOUT_BY_FORMAT[target._schema.name.rsplit("_quant_", 1)[1].removesuffix("_linear")]


def _bias_index(dims: tuple) -> int:
    """The bias's position in the full argument list."""
    return 3 if len(dims) == 3 else 4


def _args(node: Node) -> list:
    """Every argument of the quantized linear by position (defaults filled in)."""
    schema = node.target._schema.arguments
    out = list(node.args)
    for arg in schema[len(out) :]:
        out.append(node.kwargs.get(arg.name, arg.default_value))
    return out


def _fusable(gm: GraphModule, node: Node) -> bool:
    tensors = [a for a in _args(node)[1:] if a is not None and not isinstance(a, int)]
    if not all(isinstance(a, Node) and a.op == "get_attr" for a in tensors):
        return False
    return not any(get_attr_value(gm, a).is_meta for a in tensors)


def _layout_key(gm: GraphModule, node: Node) -> tuple:
    """Nodes fuse only when every tensor argument has the same presence, dtype and shape off the N dim."""
    key: list = [node.target]
    for i, (arg, dim) in enumerate(zip(_args(node)[1:], _dims(node.target)), start=1):
        if dim is None:
            key.append(arg)  # int4 group size
        elif i == _bias_index(_dims(node.target)):
            continue  # a missing bias is filled with zeros
        elif arg is None:
            key.append(None)
        else:
            t = get_attr_value(gm, arg)
            key.append((t.dtype, t.shape[:dim] + t.shape[dim + 1 :]))
    return tuple(key)


def _fuse_group(gm: GraphModule, group: list[Node]) -> list[int]:
    graph = gm.graph
    target = group[0].target
    dims = _dims(target)
    args_of = [_args(n) for n in group]
    sizes = [get_attr_value(gm, a[1]).shape[0] for a in args_of]
    bias_at = _bias_index(dims)
    with graph.inserting_before(group[0]):  # the group is in graph order
        fused_args: list = [group[0].args[0]]
        for i, dim in enumerate(dims, start=1):
            column = [a[i] for a in args_of]
            if dim is None:
                fused_args.append(column[0])
                continue
            if all(c is None for c in column):
                fused_args.append(None)
                continue
            present = [get_attr_value(gm, c) for c in column if c is not None]
            if i == bias_at:
                like = present[0]
                parts = [get_attr_value(gm, c).detach() if c is not None else like.new_zeros(s)
                         for c, s in zip(column, sizes)]
            else:
                parts = [t.detach() for t in present]
            if i == 1 and dims == _LAYOUT_BY_FORMAT["int4"]:  # the int4 qweight: rows in the total's row tiles
                fused = int4_cat_rows(parts)
            else:
                fused = torch.cat(parts, dim=dim)
            fused_args.append(graph.get_attr(add_parameter(gm, f"fused_quant_linear_arg{i}", fused)))
        fused_node = graph.call_function(target, tuple(fused_args))
        split = graph.call_function(aten.split_with_sizes.default, (fused_node, sizes, -1))
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    fused_node.meta["autodeploy_fused_sizes"] = sizes
    for node, piece in zip(group, pieces):
        piece.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(piece)
        graph.erase_node(node)
    return sizes


@TransformRegistry.register("fuse_quant_linears")
class FuseQuantLinears(Transform):
    preserves_node_values = True  # new nodes replace old ones; survivors compute what they did

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        groups: dict[tuple, list[Node]] = defaultdict(list)
        for node in find_nodes(gm, list(_layouts())):
            if _fusable(gm, node):
                groups[(node.args[0], _layout_key(gm, node))].append(node)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        fused = []
        for nodes in groups.values():
            if len(nodes) < 2:
                continue
            nodes.sort(key=order.__getitem__)
            fused.append(_fuse_group(gm, nodes))
        if fused:
            gm.graph.eliminate_dead_code()
            drop_unused_attributes(gm)
        return TransformInfo(num_matches=len(fused), details={"group_sizes": fused[:4]})
