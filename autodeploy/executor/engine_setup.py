"""Building the model runner: size the KV cache from memory, allocate it, capture CUDA graphs.

On CUDA a profiling forward of the largest step (``max_num_tokens`` tokens in prefill sequences of at most
``max_seq_len``) runs first on a cache just big enough for it; the activation peak it shows is kept free, and
the KV pool takes ``kv_cache.free_memory_fraction`` of what remains.
"""

from __future__ import annotations

import gc
import logging
import math

import torch
from torch.fx import GraphModule

from ..config import AutoDeployConfig
from ..distributed import min_across_ranks
from ..transforms import SharedContext
from .compile_glue import compile_glue
from .kv_cache import allocate_kv_cache, num_blocks_for
from .model_runner import ModelRunner, StepEntry

logger = logging.getLogger("autodeploy.executor")


def _profiling_entries(num_tokens: int, max_seq_len: int, block_size: int) -> list[StepEntry]:
    entries, next_block, left = [], 0, num_tokens
    while left > 0:
        n = min(left, max_seq_len)
        blocks = math.ceil(n / block_size)
        entries.append(StepEntry([1] * n, 0, list(range(next_block, next_block + blocks)), True))
        next_block += blocks
        left -= n
    return entries


def _make_runner(gm, ctx, config, caches, max_seq_len: int) -> ModelRunner:
    return ModelRunner(
        gm,
        ctx.cache,
        caches,
        device=ctx.device,
        block_size=config.kv_cache.block_size,
        max_num_tokens=config.max_num_tokens,
        max_batch_size=config.max_batch_size,
        max_seq_len=max_seq_len,
    )


def measure_free_memory(gm: GraphModule, ctx: SharedContext, config: AutoDeployConfig, max_seq_len: int) -> int:
    """Bytes free for the KV cache after weights and the peak activations of the largest step."""
    block_size = config.kv_cache.block_size
    entries = _profiling_entries(min(config.max_num_tokens, config.max_batch_size * max_seq_len), max_seq_len, block_size)
    entries = entries[: config.max_batch_size]
    blocks = sum(len(e.block_ids) for e in entries)
    caches = allocate_kv_cache(ctx.cache, config.kv_cache, blocks, ctx.device)
    runner = _make_runner(gm, ctx, config, caches, max_seq_len)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.execute(entries, [])
    torch.cuda.synchronize()
    activation_peak = torch.cuda.max_memory_allocated() - before
    del runner, caches
    gc.collect()  # garbage in reference cycles would otherwise count as used memory here
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    logger.info("profiling step: activation peak %.2f GiB, free %.2f GiB", activation_peak / 2**30, free / 2**30)
    return max(0, free - activation_peak)


def build_runner(
    gm: GraphModule, ctx: SharedContext, config: AutoDeployConfig, max_seq_len: int
) -> tuple[ModelRunner, int]:
    """The runner over a freshly sized and allocated KV cache (CUDA graphs captured when enabled)."""
    free = measure_free_memory(gm, ctx, config, max_seq_len) if ctx.device.type == "cuda" else None
    wanted_tokens = config.max_batch_size * max_seq_len
    num_blocks = num_blocks_for(ctx.cache, config.kv_cache, ctx.device, wanted_tokens, free)
    if ctx.world_size > 1:  # tensor parallel: one scheduler's block ids must fit every rank
        num_blocks = min_across_ranks(num_blocks)
    caches = allocate_kv_cache(ctx.cache, config.kv_cache, num_blocks, ctx.device)
    runner = _make_runner(gm, ctx, config, caches, max_seq_len)
    if config.torch_compile.enabled:
        runner.gm = compile_glue(gm, config.torch_compile)
    if ctx.device.type == "cuda":
        warm_up(runner, config, max_seq_len)
    if config.cuda_graphs:
        runner.capture_cuda_graphs(config.max_batch_size, config.prefill_cuda_graph_tokens)
    return runner, num_blocks


def warm_up(runner: ModelRunner, config: AutoDeployConfig, max_seq_len: int) -> None:
    """Eager steps of every kind (prefill, chunked prefill, mixed, decode; token counts with and without the
    divisibility Triton specialises on), then prefills of 64, 128, ... up to ``max_num_tokens`` tokens (kernels
    whose tiles follow the step's size, such as the fused MoE's, compile one variant per size class), so kernel
    compilation happens here and not in the first requests."""
    bs = config.kv_cache.block_size
    budget = min(config.max_num_tokens, max_seq_len - 1)
    num_blocks = runner.kv_caches[0].shape[0]

    def seq(n: int, start: int, first_block: int) -> StepEntry:  # its KV lands in blocks no request owns yet
        blocks = math.ceil((start + n) / bs)
        return StepEntry([1] * n, start, [b % num_blocks for b in range(first_block, first_block + blocks)], True)

    def prefill_of(tokens: int) -> list[StepEntry]:  # sequences of at most ``budget`` tokens
        entries, first_block = [], 0
        while tokens > 0:
            n = min(tokens, budget)
            entries.append(seq(n, 0, first_block))
            first_block += math.ceil(n / bs)
            tokens -= n
        return entries

    steps = [
        ([seq(min(17, budget), 0, 0)], []),
        ([seq(min(16, budget), 0, 0), seq(min(5, budget), 0, 8)], [seq(1, 3, 16)]),
        ([seq(min(33, budget), min(16, budget), 0)], [seq(1, 7, 16), seq(1, 9, 24)]),
        ([], [seq(1, 5, 0), seq(1, 9, 8), seq(1, 2, 16)]),
    ]
    sizes = [n for n in (1 << p for p in range(6, 31)) if n < config.max_num_tokens] + [config.max_num_tokens]
    steps += [(prefill_of(n), []) for n in sizes]
    cap = config.max_batch_size  # the runner's buffers hold that many sequences a step
    for prefills, decodes in steps:
        prefills = prefills[:cap]
        runner.execute(prefills, decodes[: cap - len(prefills)])
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
