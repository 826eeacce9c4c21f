"""``fuse_rope_attention``: a layer's RoPE of q and k moves into its cached-attention op's KV-cache write.

Matches: a ``triton_cached_attention`` or ``torch_cached_attention`` whose q and k are each a RoPE op's output
(``torch_rope`` / ``triton_rope``) with the same cos, sin and form, and used by nothing else. Emits: the attention
with the unrotated q and k and ``rope_cos`` / ``rope_sin`` / ``rope_interleaved`` set (the cached-attention
contract, ``custom_ops/cached_attention.py``). The Triton backend rotates q and k in its KV-write launch
(``rope_write_kv``): two launches fewer per layer; the torch reference rotates first, as before.
Limits: FlashInfer keeps its RoPE launches; a rotated q or k with other users (or q and k rotated with different
tables) stays as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from .base import SharedContext, Transform, TransformConfig, TransformInfo, TransformRegistry
from .graph import find_nodes, is_op


#: position of ``rope_cos`` in the cached-attention signature (after ``chunk_size``)
_ROPE_COS_POSITION = 17


def _attention_ops() -> list[Any]:
    ops = [torch.ops.autodeploy.torch_cached_attention.default]
    if hasattr(torch.ops.autodeploy, "triton_cached_attention"):
        ops.append(torch.ops.autodeploy.triton_cached_attention.default)
    return ops


def _rope_ops() -> list[Any]:
    ops = [torch.ops.autodeploy.torch_rope.default]
    if hasattr(torch.ops.autodeploy, "triton_rope"):
        ops.append(torch.ops.autodeploy.triton_rope.default)
    return ops


def _rope_args(node: Node) -> tuple[Any, Any, Any, bool]:
    """``(x, cos, sin, interleaved)`` of a RoPE node, wherever its arguments sit."""
    names = ("x", "cos", "sin", "interleaved")
    values = dict(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    return values["x"], values["cos"], values["sin"], bool(values.get("interleaved", False))


@TransformRegistry.register("fuse_rope_attention")
class FuseRopeAttention(Transform):
    config_class = TransformConfig
    requires_shape_prop = False  # the attention's output is unchanged

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        rope_ops = _rope_ops()
        fused = 0
        for attention in find_nodes(gm, _attention_ops()):
            q, k = attention.args[0], attention.args[1]
            if not all(isinstance(n, Node) and is_op(n, rope_ops) and len(n.users) == 1 for n in (q, k)):
                continue
            if attention.kwargs.get("rope_cos") is not None or len(attention.args) > _ROPE_COS_POSITION:
                continue  # already carries RoPE
            q_x, q_cos, q_sin, q_form = _rope_args(q)
            k_x, k_cos, k_sin, k_form = _rope_args(k)
            if (q_cos, q_sin, q_form) != (k_cos, k_sin, k_form):
                continue
            attention.args = (q_x, k_x, *attention.args[2:])
            attention.kwargs = {**attention.kwargs, "rope_cos": q_cos, "rope_sin": q_sin, "rope_interleaved": q_form}
            gm.graph.erase_node(q)
            gm.graph.erase_node(k)
            fused += 1
        return TransformInfo(num_matches=fused)
