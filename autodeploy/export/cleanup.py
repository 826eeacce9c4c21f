"""Remove what ``torch.export`` leaves that computes nothing.

Used on every exported model (the ``cleanup_noop_ops`` transform) and on every traced pattern, so models and
patterns reach the matcher in the same canonical form: same-dtype casts, full slices, same-shape views,
inverse transpose pairs, eval-mode dropout, aliases and metadata assertions are gone.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
INT64_MAX = 9223372036854775807

_ASSERTS = {aten._assert_tensor_metadata.default}
_ALIASES = {aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_shape(a: torch.Tensor, shape) -> bool:
    if len(a.shape) != len(shape):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a.shape, shape))


def _noop_source(node: Node) -> Node | None:
    """If ``node`` returns its first input unchanged, that input; else ``None``."""
    target, args, kwargs = node.target, node.args, node.kwargs
    src = args[0] if args and isinstance(args[0], Node) else None
    if src is None:
        return None
    src_val, out_val = _val(src), _val(node)
    if target in _ALIASES:
        return src
    if target in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.to.device):
        if src_val is None or out_val is None:
            return None
        same = (
            src_val.dtype == out_val.dtype
            and src_val.device == out_val.device
            and kwargs.get("memory_format") in (None, torch.preserve_format)
        )
        return src if same else None
    if target == aten.slice.Tensor:
        start = args[2] if len(args) > 2 else kwargs.get("start", 0)
        end = args[3] if len(args) > 3 else kwargs.get("end", INT64_MAX)
        step = args[4] if len(args) > 4 else kwargs.get("step", 1)
        if start in (0, None) and end in (INT64_MAX, None) and step == 1:
            return src
        return None
    if target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
        if src_val is not None and out_val is not None and same_shape(src_val, out_val.shape):
            return src
        return None
    if target == aten.dropout.default:
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        train = args[2] if len(args) > 2 else kwargs.get("train", False)
        return src if (not train or p == 0) else None
    if target == aten.transpose.int and src.op == "call_function" and src.target == aten.transpose.int:
        if src_val is None:
            return None
        rank = src_val.dim()
        if {d % rank for d in args[1:3]} == {d % rank for d in src.args[1:3]}:
            return src.args[0]
    return None


def remove_noop_ops(gm: GraphModule) -> int:
    """Drop no-op nodes in place (uses ``meta["val"]``); returns how many were removed. Does not recompile."""
    removed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
            removed += 1
            continue
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS:
            graph.erase_node(node)
            removed += 1
            continue
        src = _noop_source(node)
        if src is not None:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            removed += 1
    graph.eliminate_dead_code()
    return removed
