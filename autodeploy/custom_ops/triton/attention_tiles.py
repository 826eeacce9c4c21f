"""The Triton paged attention's tiles and launch shapes (``cached_attention.py`` runs the kernels): the config
dataclass, its defaults per head size and dtype, the decode split-KV factor and the decode tile a launch picks.
Everything here is host-side and depends on shapes only, so a CUDA-graph capture and its replays agree."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

from ..cached_attention import FP8_CACHE_DTYPES
from ._common import device_sms

MAX_SPLITS = 64


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch shapes. ``default_config`` picks them from the head size and dtype."""

    prefill_block_m: int = 128
    prefill_block_n: int = 64
    prefill_warps: int = 8
    prefill_stages: int = 3
    decode_block_n: int = 64
    decode_warps: int = 4
    decode_stages: int = 3
    decode_maxnreg: int | None = None  # registers a decode thread may use (None: the compiler's choice)


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    if device.type != "cuda":  # interpreter: small tiles keep the tests' multi-tile paths busy
        return AttentionConfig(32, 16, 4, 1, 16, 4, 1)
    if dtype == torch.float32:  # exact fp32 products (no tensor cores): small register tiles, for tests only
        return AttentionConfig(16, 16, 4, 1, 16, 4, 1) if head_dim <= 128 else AttentionConfig(16, 16, 8, 1, 16, 8, 1)
    if head_dim <= 64:
        return AttentionConfig(128, 64, 4, 3, 64, 4, 3)
    if head_dim <= 128:
        return AttentionConfig(128, 64, 8, 3, 64, 4, 3)
    return AttentionConfig(64, 32, 8, 2, 32, 4, 2)


def heads_per_program(group: int, limit: int) -> int:
    """The largest divisor of the GQA group size that is at most ``limit`` (no masked-off head rows)."""
    return max(d for d in range(1, min(group, limit) + 1) if group % d == 0)


def decode_splits(num_decode: int, programs_per_seq: int, max_ctx: int, block_n: int, device: torch.device) -> int:
    """Split-KV factor from shapes only (CUDA-graph safe): about two programs per multiprocessor."""
    base = num_decode * programs_per_seq
    target = 2 * device_sms(device)
    if base >= target:
        return 1
    return max(1, min(triton.cdiv(target, base), triton.cdiv(max_ctx, block_n), MAX_SPLITS))


@functools.lru_cache(maxsize=1024)  # called by every eager decode launch: same inputs, same tile
def decode_tile_for(
    programs: int, cache_dtype: torch.dtype, head_dim: int, device: torch.device, cfg: AttentionConfig
) -> AttentionConfig:
    """The decode kernel's tile on the GPU when no config is given, from ``bench/decode_attention.py``'s sweeps
    (run 22 on an H100, run 52 on an H200; µs a layer, Llama-3.1-8B's heads):

    - heads up to 128 (the sweeps ran 128) and at least eight programs a multiprocessor (many sequences): one warp a
      program, so no product's operands or softmax statistics cross warps; 32 keys, 3 stages (1000 x 192 tokens:
      fp8 cache 142.0 vs 204.9 µs with the 4-warp default, bf16 206.0 vs 215.4; 256 x 2048: fp8 317.9 vs 478.1,
      bf16 489.2 vs 500.7);
    - heads up to 128, fewer programs, an fp8 cache: 64 keys, 4 warps, at most 128 registers a thread (64 x 1024
      tokens: 59.1 vs 79.7 µs uncapped; batch 1 at 4096 tokens: 12.0 vs 13.4 µs at 32 keys);
    - else, fewer programs than ``decode_splits`` fills the GPU with (the step is split over the keys): 32 keys
      (batch 1 at 384 tokens: 6.05 vs 6.93 µs, run 22);
    - ``cfg`` otherwise."""
    sms = device_sms(device)
    if head_dim <= 128 and programs >= 8 * sms:
        return replace(cfg, decode_block_n=32, decode_warps=1, decode_stages=3, decode_maxnreg=None)
    if head_dim <= 128 and cache_dtype in FP8_CACHE_DTYPES:
        return replace(cfg, decode_block_n=64, decode_warps=4, decode_stages=3, decode_maxnreg=128)
    if programs < 2 * sms:
        return replace(cfg, decode_block_n=32)
    return cfg
