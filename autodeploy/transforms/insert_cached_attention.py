"""``insert_cached_attention``: every ``torch_attention`` becomes the backend's paged-KV-cache op.

Matches: each ``autodeploy::torch_attention`` node. Emits: ``autodeploy::<backend>_cached_attention`` with the
batch metadata and two KV pools per layer as new graph inputs, in the order of ``CACHE_METADATA`` and then
``k_cache_<i>``, ``v_cache_<i>`` (DESIGN.md, "The graph contract after cache insertion"). Records a
``KVCacheSpec`` in ``ctx.cache`` so the model runner can size and allocate the pools.
Limits: attention must already be canonical (a graph without ``torch_attention`` is an error), and its masks folded
into ``sliding_window`` / ``chunk_size`` (an attention node still carrying a ``mask`` is an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.attention_backends import AttentionLayerNeeds, resolve_backend
from ..errors import TransformError, UnsupportedArchitectureError
from .base import SharedContext, Transform, TransformConfig, TransformInfo, TransformRegistry
from .graph import find_nodes, node_val, placeholders

#: (name, dtype) of the metadata inputs, in graph-input order, after input_ids and position_ids
CACHE_METADATA: tuple[tuple[str, torch.dtype], ...] = (
    ("seq_lens", torch.int32),
    ("cu_seqlens", torch.int32),
    ("cache_lens", torch.int32),
    ("page_table", torch.int32),
    ("slot_mapping", torch.int64),
    ("batch_info", torch.int32),
)


@dataclass(frozen=True)
class LayerCacheSpec:
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    num_q_heads: int = 0


@dataclass
class KVCacheSpec:
    """What the runner must allocate: one K and one V pool per attention layer, in graph-input order."""

    backend: str
    cuda_graph_safe: bool
    layers: list[LayerCacheSpec] = field(default_factory=list)

    def bytes_per_token(self, cache_dtype: torch.dtype | None = None) -> int:
        total = 0
        for layer in self.layers:
            itemsize = (cache_dtype or layer.dtype).itemsize
            total += layer.num_kv_heads * (layer.head_dim + layer.v_head_dim) * itemsize
        return total


_MASK_ARG = 9  # torch_attention's trailing ``mask``: folded away by match_attention, never cached


_ATTENTION_PARAMS = ("q", "k", "v", "scale", "sliding_window", "logit_cap", "sinks", "alibi_slopes", "chunk_size")


def _layer_needs(node: Node) -> AttentionLayerNeeds:
    args = dict(zip(_ATTENTION_PARAMS, node.args)) | dict(node.kwargs)
    q, k, v = (node_val(args[name]) for name in ("q", "k", "v"))
    chunk = args.get("chunk_size")
    return AttentionLayerNeeds(
        num_q_heads=q.shape[2],
        num_kv_heads=k.shape[2],
        head_dim=k.shape[3],
        v_head_dim=v.shape[3],
        dtype=q.dtype,
        sinks=args.get("sinks") is not None,
        alibi=args.get("alibi_slopes") is not None,
        chunked=chunk is not None and chunk > 0,
    )


class InsertCachedAttentionConfig(TransformConfig):
    backend: Literal["auto", "torch", "triton", "flashinfer"] = "auto"
    kv_cache_scale: float = 1.0  # float8 caches store k / scale, v / scale (config.py maps kv_cache.scale)


@TransformRegistry.register("insert_cached_attention")
class InsertCachedAttention(Transform):
    config_class = InsertCachedAttentionConfig
    requires_shape_prop = False

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        attention_nodes = find_nodes(gm, torch.ops.autodeploy.torch_attention.default)
        if not attention_nodes:
            raise TransformError(
                "no autodeploy::torch_attention in the graph, so there is nothing to attach a KV cache to",
                where="insert_cached_attention",
                hint="run `autodeploy inspect` to see whether export routed or match_attention matched the attention",
            )
        masked = [n for n in attention_nodes if len(n.args) > _MASK_ARG and n.args[_MASK_ARG] is not None]
        if masked:
            why = masked[0].meta.get("autodeploy_mask_rejected", "match_attention did not fold it")
            raise UnsupportedArchitectureError(
                f"{len(masked)} attention layers keep a mask that is not causal, windowed or chunked, which a paged "
                f"KV cache cannot apply: {why}",
                where=f"insert_cached_attention, node {masked[0].name}",
                hint="`autodeploy inspect` shows match_attention's details['rejected'] for every layer",
            )
        backend = resolve_backend(self.config.backend, ctx.device, [_layer_needs(n) for n in attention_nodes])
        graph = gm.graph
        last = placeholders(gm)[-1]
        metadata: list[Node] = []
        with graph.inserting_after(last):
            for name, _ in reversed(CACHE_METADATA):
                metadata.insert(0, graph.placeholder(name))
        spec = KVCacheSpec(backend=backend.name, cuda_graph_safe=backend.cuda_graph_safe)
        last = metadata[-1]
        for i, node in enumerate(attention_nodes):
            q, k, v = node.args[:3]
            k_val, v_val = node_val(k), node_val(v)
            spec.layers.append(
                LayerCacheSpec(k_val.shape[2], k_val.shape[3], v_val.shape[3], k_val.dtype, node_val(q).shape[2])
            )
            with graph.inserting_after(last):
                k_cache = graph.placeholder(f"k_cache_{i}")
            with graph.inserting_after(k_cache):
                v_cache = graph.placeholder(f"v_cache_{i}")
            last = v_cache
            extra = list(node.args[3:])
            kwargs = dict(node.kwargs)
            if self.config.kv_cache_scale != 1.0:
                kwargs["kv_scale"] = float(self.config.kv_cache_scale)
            with graph.inserting_before(node):
                cached = graph.call_function(backend.op, (q, k, v, k_cache, v_cache, *metadata, *extra), kwargs)
            cached.meta.update(node.meta)
            node.replace_all_uses_with(cached)
            graph.erase_node(node)
        ctx.cache = spec
        return TransformInfo(num_matches=len(attention_nodes), details={"backend": backend.name})
