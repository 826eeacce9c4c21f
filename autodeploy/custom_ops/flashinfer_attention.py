"""FlashInfer paged attention: ``autodeploy::flashinfer_cached_attention`` (contract: ``cached_attention.py``).

FlashInfer splits attention into a host-side ``plan`` (once per step, from the batch layout) and a device-side
``run`` (once per layer). The graph only holds the ``run`` half: before each step the model runner hands the
step's layout to a ``FlashInferPlanner`` (``flashinfer_planner.py``), which plans one wrapper per attention
*variant* (scale, sliding window, soft-cap, KV scale) and makes them current; each layer's op writes its new
k/v rows into the pools (the Triton scatter) and runs its variant's current wrapper. Decode-only steps use
decode wrappers (one per CUDA-graph bucket, planned into fixed buffers so the captured graph replays them);
any step with a prefill uses the prefill wrapper, which also serves the decode rows of a mixed batch.

FlashInfer has no attention sinks, model-specific ALiBi slopes or chunked attention here, runs fp16/bf16
queries only and head sizes 64, 128 and 256 with equal K and V head sizes: ``unsupported_reason`` says which
of these a graph needs, and ``attn_backend=auto`` then picks the next backend.
"""

from __future__ import annotations

import torch

from . import cached_attention as _reference  # noqa: F401  (registers the torch op family)
from .cached_attention import FP8_CACHE_DTYPES

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

_active_planner = None  # the planner of the step being run (set by FlashInferPlanner.plan)


#: positional parameters of every ``<backend>_cached_attention`` op, in order (``kv_scale`` is keyword-only)
CACHED_ATTENTION_PARAMS = (
    "q", "k", "v", "k_cache", "v_cache", "seq_lens", "cu_seqlens", "cache_lens", "page_table", "slot_mapping",
    "batch_info", "scale", "sliding_window", "logit_cap", "sinks", "alibi_slopes", "chunk_size",
)  # fmt: skip


def cached_attention_args(node) -> dict:
    """A cached-attention node's arguments by name, defaults filled in."""
    args = dict.fromkeys(CACHED_ATTENTION_PARAMS[11:])
    args["kv_scale"] = 1.0
    args.update(zip(CACHED_ATTENTION_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def set_active_planner(planner) -> None:
    global _active_planner
    _active_planner = planner


def variant_key(scale, sliding_window, logit_cap, kv_scale) -> tuple:
    """What a layer's plan depends on besides the batch layout (layers with equal keys share one plan)."""
    window = int(sliding_window) if sliding_window is not None and sliding_window > 0 else 0
    cap = float(logit_cap) if logit_cap is not None and logit_cap > 0 else 0.0
    return (None if scale is None else float(scale), window, cap, float(kv_scale))


def unsupported_reason(
    head_dim: int, v_head_dim: int, dtype: torch.dtype, sinks, alibi_slopes, chunk_size
) -> str | None:
    """Why one attention layer cannot run on FlashInfer here, or None."""
    if sinks is not None:
        return "attention sinks"
    if alibi_slopes is not None:
        return "ALiBi slopes"
    if chunk_size is not None and chunk_size > 0:
        return "chunked attention"
    if dtype not in SUPPORTED_DTYPES:
        return f"{dtype} activations (FlashInfer runs float16/bfloat16)"
    if head_dim != v_head_dim or head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head size {head_dim}/{v_head_dim} (FlashInfer: equal K/V sizes of {SUPPORTED_HEAD_DIMS})"
    return None


def _write_kv(k, v, k_cache, v_cache, slot_mapping, kv_scale: float) -> None:
    if k.is_cuda:
        from .triton.kv_write import write_kv

        write_kv(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    else:  # CPU tests drive the planner with a stand-in for the flashinfer package
        _reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, kv_scale)


@torch.library.custom_op("autodeploy::flashinfer_cached_attention", mutates_args=("k_cache", "v_cache"))
def flashinfer_cached_attention(
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
    *,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    if _active_planner is None:  # what layers need was checked when the backend was chosen (unsupported_reason)
        raise RuntimeError("flashinfer_cached_attention: no step was planned (the model runner plans each step)")
    _write_kv(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    wrapper = _active_planner.wrapper(variant_key(scale, sliding_window, logit_cap, kv_scale))
    cache_scale = float(kv_scale) if k_cache.dtype in FP8_CACHE_DTYPES else None
    num_rows = q.shape[1]
    out = wrapper.run(
        q.reshape(num_rows, q.shape[2], q.shape[3]).contiguous(),
        (k_cache, v_cache),
        k_scale=cache_scale,
        v_scale=cache_scale,
    )
    return out.view(1, num_rows, q.shape[2], v.shape[-1])


flashinfer_cached_attention.register_fake(_reference.cached_attention_fake)
