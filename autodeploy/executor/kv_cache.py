"""Sizing and allocating the paged KV-cache pools described by a ``KVCacheSpec``.

On CUDA the pool takes ``free_memory_fraction`` of the memory left free after the weights and a profiling
forward of the largest step (``max_num_tokens`` tokens); on CPU, where memory can't be measured the same way,
it holds ``max_batch_size * max_seq_len`` tokens up to ``CPU_CACHE_BYTES``. ``kv_cache.max_tokens`` caps both.
"""

from __future__ import annotations

import logging
import math

import torch

from ..config import KVCacheConfig
from ..errors import KVCacheExhaustedError
from ..transforms.insert_cached_attention import KVCacheSpec

logger = logging.getLogger("autodeploy.executor")

CPU_CACHE_BYTES = 2 << 30


def cache_dtype_for(spec: KVCacheSpec, config: KVCacheConfig) -> torch.dtype | None:
    return torch.float8_e4m3fn if config.dtype == "fp8" else None


def bytes_per_block(spec: KVCacheSpec, config: KVCacheConfig) -> int:
    return spec.bytes_per_token(cache_dtype_for(spec, config)) * config.block_size


def num_blocks_for(
    spec: KVCacheSpec,
    config: KVCacheConfig,
    device: torch.device,
    max_tokens_wanted: int,
    free_bytes: int | None,
) -> int:
    """How many blocks the pool gets. ``free_bytes``: measured free device memory (None on CPU)."""
    per_block = bytes_per_block(spec, config)
    if free_bytes is None:
        blocks = math.ceil(min(max_tokens_wanted, CPU_CACHE_BYTES // max(1, spec.bytes_per_token())) / config.block_size)
    else:
        blocks = int(free_bytes * config.free_memory_fraction) // per_block
    if config.max_tokens is not None:
        blocks = min(blocks, math.ceil(config.max_tokens / config.block_size))
    if blocks < 1:
        raise KVCacheExhaustedError(
            f"no device memory is left for the KV cache ({per_block} bytes per block of {config.block_size} tokens)",
            hint="use a smaller model or dtype, lower max_num_tokens, or raise kv_cache.free_memory_fraction",
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB",
        blocks,
        config.block_size,
        blocks * config.block_size,
        blocks * per_block / 2**30,
    )
    return blocks


def allocate_kv_cache(
    spec: KVCacheSpec, config: KVCacheConfig, num_blocks: int, device: torch.device
) -> list[torch.Tensor]:
    """``[k_0, v_0, k_1, v_1, ...]``, each ``[num_blocks, block_size, Nkv, D]``."""
    dtype_override = cache_dtype_for(spec, config)
    pools: list[torch.Tensor] = []
    for layer in spec.layers:
        dtype = dtype_override or layer.dtype
        shape_k = (num_blocks, config.block_size, layer.num_kv_heads, layer.head_dim)
        shape_v = (num_blocks, config.block_size, layer.num_kv_heads, layer.v_head_dim)
        pools.append(torch.zeros(shape_k, dtype=dtype, device=device))
        pools.append(torch.zeros(shape_v, dtype=dtype, device=device))
    return pools
