"""Paged-KV-cache attention over a flattened token batch: the contract every cached backend implements.

After ``insert_cached_attention`` the graph runs one forward over ``T`` tokens of ``B`` sequences: the prefill
(or prefill-chunk) sequences first, then the decode sequences (one token each). Per backend ``<b>`` the op is
``autodeploy::<b>_cached_attention`` with this signature (the torch one here is the reference)::

    q            [1, T, Nq, D]      k [1, T, Nkv, D]      v [1, T, Nkv, Dv]
    k_cache      [num_blocks, block_size, Nkv, D]        (mutated: the new k are written first)
    v_cache      [num_blocks, block_size, Nkv, Dv]       (mutated)
    seq_lens     [B] int32   new tokens of each sequence in this step
    cu_seqlens   [B + 1] int32   offsets of each sequence's tokens in T (cu_seqlens[0] = 0)
    cache_lens   [B] int32   tokens of each sequence already in the cache before this step
    page_table   [B, P] int32    block ids of each sequence, in order
    slot_mapping [T] int64   flat cache slot (block * block_size + offset) of each new token; < 0: skip
    batch_info   [3] int32 on the host: (num_prefill_seqs, num_prefill_tokens, num_decode_seqs)
    scale, sliding_window, logit_cap, sinks, alibi_slopes, chunk_size: as in ``torch_attention`` (``chunk_size``
    is trailing: a graph passes it only when set)
    kv_scale     float, keyword: float8 caches store ``clamp(k / kv_scale)`` (and v), read back times kv_scale;
                 caches of other dtypes ignore it
    rope_cos, rope_sin, rope_interleaved   keyword, optional ([1, T or 1, R]): q and k are first rotated exactly
                 as ``torch_rope(x, rope_cos, rope_sin, rope_interleaved)`` (``fuse_rope_attention`` moves a
                 model's RoPE here, so a backend can do it in its cache write)
    q_norm_weight, k_norm_weight   optional ([D]; positional after rope_sin, as torch.library wants tensors),
                 with qk_norm_eps, qk_norm_weight_offset (keyword): before the RoPE,
                 each head of q (and of k) is ``torch_rmsnorm(x, weight, qk_norm_eps, qk_norm_weight_offset)``
                 (Qwen3's and Gemma 3's per-head norms; ``fuse_rope_attention`` moves them here with the RoPE)
    -> out [1, T, Nq, Dv]

Token ``i`` of sequence ``s`` sits at absolute position ``cache_lens[s] + i`` and attends causally to every
cached or new key of ``s`` up to its own position. Rows of ``T`` past ``cu_seqlens[B]`` are padding (CUDA-graph
buckets) and their outputs are unspecified.
"""

from __future__ import annotations

import torch

from .attention import attention_reference
from .rmsnorm import rmsnorm_reference
from .rope import rope_reference


FP8_CACHE_DTYPES = (torch.float8_e4m3fn,)
FP8_CACHE_MAX = 448.0


def to_cache(x: torch.Tensor, cache: torch.Tensor, kv_scale: float = 1.0) -> torch.Tensor:
    """``x`` in the cache's dtype: float8 caches store ``x / kv_scale``, saturated at the format's maximum."""
    if cache.dtype in FP8_CACHE_DTYPES:
        return (x.float() / kv_scale).clamp(-FP8_CACHE_MAX, FP8_CACHE_MAX).to(cache.dtype)
    return x.to(cache.dtype)


def from_cache(x: torch.Tensor, dtype: torch.dtype, kv_scale: float = 1.0) -> torch.Tensor:
    if x.dtype in FP8_CACHE_DTYPES and kv_scale != 1.0:
        return (x.float() * kv_scale).to(dtype)
    return x.to(dtype)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float = 1.0,
) -> None:
    """Scatter the new ``k``/``v`` rows ``[1, T, Nkv, D]`` into the paged pools at ``slot_mapping``."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    n_kv = k.shape[2]
    k_cache.view(-1, n_kv, k_cache.shape[-1])[slots] = to_cache(k[0][valid], k_cache, kv_scale)
    v_cache.view(-1, n_kv, v_cache.shape[-1])[slots] = to_cache(v[0][valid], v_cache, kv_scale)


def gather_kv(cache: torch.Tensor, page_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached rows of one sequence: ``[length, Nkv, D]``."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[page_table_row[:num_blocks].long()]  # [nb, block_size, Nkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


@torch.library.custom_op("autodeploy::torch_cached_attention", mutates_args=("k_cache", "v_cache"))
def torch_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cache_lens: torch.Tensor,
    page_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    batch_info: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    *,
    kv_scale: float = 1.0,
    rope_interleaved: bool = False,
    qk_norm_eps: float = 1e-6,
    qk_norm_weight_offset: float = 0.0,
) -> torch.Tensor:
    if q_norm_weight is not None:
        q = rmsnorm_reference(q, q_norm_weight, qk_norm_eps, qk_norm_weight_offset)
    if k_norm_weight is not None:
        k = rmsnorm_reference(k, k_norm_weight, qk_norm_eps, qk_norm_weight_offset)
    if rope_cos is not None:
        q = rope_reference(q, rope_cos, rope_sin, rope_interleaved)
        k = rope_reference(k, rope_cos, rope_sin, rope_interleaved)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    num_seqs = int(batch_info[0]) + int(batch_info[2])
    starts = cu_seqlens[: num_seqs + 1].tolist()
    lens = seq_lens[:num_seqs].tolist()
    cached = cache_lens[:num_seqs].tolist()
    for s in range(num_seqs):
        start, n_new, n_cached = starts[s], lens[s], cached[s]
        if n_new == 0:
            continue
        total = n_cached + n_new
        keys = gather_kv(k_cache, page_table[s], total).unsqueeze(0)  # [1, total, Nkv, D]
        values = gather_kv(v_cache, page_table[s], total).unsqueeze(0)
        positions = torch.arange(total, device=q.device)
        out[:, start : start + n_new] = attention_reference(
            q[:, start : start + n_new],
            from_cache(keys, q.dtype, kv_scale),
            from_cache(values, q.dtype, kv_scale),
            scale,
            sliding_window,
            logit_cap,
            sinks,
            alibi_slopes,
            q_positions=positions[n_cached:],
            k_positions=positions,
            chunk_size=chunk_size,
        )
    return out


@torch_cached_attention.register_fake
def cached_attention_fake(
    q, k, v, k_cache, v_cache, seq_lens, cu_seqlens, cache_lens, page_table, slot_mapping, batch_info,
    scale=None, sliding_window=None, logit_cap=None, sinks=None, alibi_slopes=None, chunk_size=None, rope_cos=None,
    rope_sin=None, q_norm_weight=None, k_norm_weight=None, *, kv_scale=1.0, rope_interleaved=False,
    qk_norm_eps=1e-6, qk_norm_weight_offset=0.0,
):
    """The fake kernel of every ``<backend>_cached_attention`` (same signature, same output)."""
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
