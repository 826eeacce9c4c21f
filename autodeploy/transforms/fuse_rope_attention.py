"""``fuse_rope_attention``: a layer's RoPE of q and k moves into its cached-attention op's KV-cache write.

Matches: a ``triton_cached_attention`` or ``torch_cached_attention`` whose q and k are each a RoPE op's output
(``torch_rope`` / ``triton_rope``) with the same cos, sin and form, and used by nothing else. Emits: the attention
with the unrotated q and k and ``rope_cos`` / ``rope_sin`` / ``rope_interleaved`` set (the cached-attention
contract, ``custom_ops/cached_attention.py``). The Triton backend rotates q and k in its KV-write launch
(``rope_write_kv``): two launches fewer per layer; the torch reference rotates first, as before.
Then per-head RMSNorms of q and k right before the RoPE (Qwen3's and Gemma 3's ``q_norm`` / ``k_norm``: a
``torch_rmsnorm`` / ``triton_rmsnorm`` used only by the attention, with the same eps and weight offset, output in
its input's dtype) move in as well (``q_norm_weight`` / ``k_norm_weight``): the Triton write normalises each head
before rotating it, two launches fewer again.
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


def _norm_ops() -> list[Any]:
    ops = [torch.ops.autodeploy.torch_rmsnorm.default]
    if hasattr(torch.ops.autodeploy, "triton_rmsnorm"):
        ops.append(torch.ops.autodeploy.triton_rmsnorm.default)
    return ops


def _head_norm(node: Any) -> tuple[Any, Any, float, float] | None:
    """``(x, weight, eps, weight_offset)`` of an RMSNorm that only the attention reads, in its input's dtype."""
    if not isinstance(node, Node) or not is_op(node, _norm_ops()) or len(node.users) != 1:
        return None
    names = ("x", "weight", "eps", "weight_offset", "out_dtype")
    values = dict(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    if values.get("out_dtype") is not None:
        return None
    return values["x"], values["weight"], float(values["eps"]), float(values.get("weight_offset", 0.0))


def _fold_head_norms(gm: GraphModule, attention: Node) -> bool:
    """Move the RMSNorms of the attention's q and k (when both are such norms with one eps and offset) in."""
    q_norm, k_norm = _head_norm(attention.args[0]), _head_norm(attention.args[1])
    if q_norm is None or k_norm is None or q_norm[2:] != k_norm[2:]:
        return False
    q_node, k_node = attention.args[0], attention.args[1]
    attention.args = (q_norm[0], k_norm[0], *attention.args[2:])
    attention.kwargs = {**attention.kwargs, "q_norm_weight": q_norm[1], "k_norm_weight": k_norm[1],
                        "qk_norm_eps": q_norm[2], "qk_norm_weight_offset": q_norm[3]}
    gm.graph.erase_node(q_node)
    gm.graph.erase_node(k_node)
    return True


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
        fused = norms = 0
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
            norms += _fold_head_norms(gm, attention)
        return TransformInfo(num_matches=fused, details={"head_norms": norms})
