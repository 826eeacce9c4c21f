"""``fuse_glu``: the gated activation reads the fused gate/up GEMM directly, on the chosen kernel backend.

Matches: ``torch_glu(gate, up)`` whose ``gate`` and ``up`` are pieces ``i`` and ``i + 1`` of one
``split_with_sizes`` with exactly two pieces of equal size (what ``fuse_parallel_linears`` makes of a gate/up
pair). Emits ``torch_glu_packed(gate_up)`` (or its Triton twin), which reads the GEMM output in place; every
``torch_glu_packed`` then moves to the configured backend. Limits: a GLU whose gate/up were not fused stays.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.kernel_backends import kernel_op
from .base import KernelBackendConfig, SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, is_op

aten = torch.ops.aten


def _packed_source(gate: Node, up: Node) -> Node | None:
    """The GEMM output both halves come from, if they are its two equal, ordered halves."""
    if not (gate.target is operator.getitem and up.target is operator.getitem):
        return None
    split = gate.args[0]
    if up.args[0] is not split or not is_op(split, aten.split_with_sizes.default):
        return None
    sizes, dim = split.args[1], split.args[2] if len(split.args) > 2 else 0
    if len(sizes) != 2 or sizes[0] != sizes[1] or dim not in (-1,) or (gate.args[1], up.args[1]) != (0, 1):
        return None
    return split.args[0]


@TransformRegistry.register("fuse_glu")
class FuseGLU(Transform):
    preserves_node_values = True  # new nodes replace old ones; survivors compute what they did
    config_class = KernelBackendConfig

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        graph = gm.graph
        packed_op = kernel_op("torch_glu_packed", self.config.backend, ctx.device)
        packed = 0
        for node in find_nodes(gm, torch.ops.autodeploy.torch_glu.default):
            gate, up, activation = node.args[:3]
            source = _packed_source(gate, up)
            if source is None:
                continue
            with graph.inserting_before(node):
                new = graph.call_function(packed_op, (source, activation))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            packed += 1
        swapped = 0
        if packed_op is not torch.ops.autodeploy.torch_glu_packed.default:
            for node in find_nodes(gm, torch.ops.autodeploy.torch_glu_packed.default):
                node.target = packed_op
                swapped += 1
        return TransformInfo(num_matches=packed + swapped, details={"packed": packed, "backend_swapped": swapped})
