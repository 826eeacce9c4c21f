"""``gather_logits``: compute the LM head only for the tokens that are sampled.

Matches: the last ``aten.linear`` or quantized linear (``autodeploy::*_quant_*_linear``, when the head is
quantized) on the path to the output (the LM head), found by walking back from the output through ops with a
single tensor input (final soft-caps, scales, casts). Emits: an
``index_select(hidden, 1, logits_indices)`` on the head's input, with ``logits_indices [N] int64`` a new graph
input placed after the cache metadata. The graph then returns ``[1, N, V]`` logits instead of ``[1, T, V]``.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..errors import TransformError
from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import is_op, is_quantized_linear, placeholders

LOGITS_INDICES = "logits_indices"


def _tensor_inputs(node: Node) -> list[Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def find_lm_head(gm: GraphModule) -> Node:
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    node = output.args[0]
    while isinstance(node, Node):
        if is_op(node, torch.ops.aten.linear.default) or is_quantized_linear(node):
            return node
        inputs = _tensor_inputs(node)
        if len(inputs) != 1:
            break
        node = inputs[0]
    raise TransformError(
        "could not find the LM head (a linear feeding the output through single-input ops)",
        where="gather_logits",
        hint="disable transforms.gather_logits (logits are then computed for every token)",
    )


@TransformRegistry.register("gather_logits")
class GatherLogits(Transform):
    requires_shape_prop = False

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        head = find_lm_head(gm)
        graph = gm.graph
        with graph.inserting_after(placeholders(gm)[-1]):
            indices = graph.placeholder(LOGITS_INDICES)
        hidden = head.args[0]
        with graph.inserting_before(head):
            gathered = graph.call_function(torch.ops.aten.index_select.default, (hidden, 1, indices))
        head.replace_input_with(hidden, gathered)
        return TransformInfo(num_matches=1, details={"lm_head": str(head.args[1])})
