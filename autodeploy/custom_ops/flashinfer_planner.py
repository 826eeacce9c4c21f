"""Per-step planning for the FlashInfer backend (the host half of ``flashinfer_attention.py``).

The model runner calls ``plan(layout)`` after packing a step's inputs and before running (or replaying) the
graph. From the step's host-side layout it builds FlashInfer's paged description — ``kv_indptr`` (pages per
sequence, prefix-summed), ``kv_indices`` (their block ids, concatenated) and ``kv_last_page_len`` — and plans
one wrapper per attention variant:

- a step with any prefill: ``BatchPrefillWithPagedKVCacheWrapper`` over ``qo_indptr = cu_seqlens`` (causal,
  queries aligned to the end of each sequence's keys, which is the contract's ``cache_lens[s] + i``);
- a decode-only step of a CUDA-graph bucket: that bucket's ``BatchDecodeWithPagedKVCacheWrapper`` created in
  CUDA-graph mode, whose fixed device buffers the plan refills before every replay;
- any other decode-only step: an eager decode wrapper.

All wrappers share one float workspace (they run one after another); each keeps its own plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import GraphModule

from .flashinfer_attention import cached_attention_args, set_active_planner, variant_key
from .step_layout import StepLayout

WORKSPACE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PagedLayout:
    kv_indptr: torch.Tensor  # [B + 1] int32
    kv_indices: torch.Tensor  # [pages] int32
    kv_last_page_len: torch.Tensor  # [B] int32


def paged_layout(layout: StepLayout, page_size: int) -> PagedLayout:
    """FlashInfer's view of the page table: the pages each sequence's keys (cached + new) occupy."""
    kv_lens = layout.cache_lens.astype(np.int64) + layout.seq_lens.astype(np.int64)
    pages = (kv_lens + page_size - 1) // page_size
    indptr = np.zeros(len(pages) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    columns = np.arange(layout.page_table.shape[1])
    indices = layout.page_table[columns[None, :] < pages[:, None]].astype(np.int32)  # row-major: seq by seq
    last = (kv_lens - (pages - 1) * page_size).astype(np.int32)
    return PagedLayout(torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last))


def attention_variants(gm: GraphModule) -> list[tuple]:
    """The distinct variant keys of the graph's FlashInfer attention nodes (order of first appearance)."""
    target = torch.ops.autodeploy.flashinfer_cached_attention.default
    keys: list[tuple] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is target:
            args = cached_attention_args(node)
            key = variant_key(args["scale"], args["sliding_window"], args["logit_cap"], args["kv_scale"])
            if key not in keys:
                keys.append(key)
    return keys


class FlashInferPlanner:
    def __init__(
        self,
        variants: list[tuple],
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        max_pages_per_seq: int,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        device: torch.device,
    ):
        import flashinfer

        self.flashinfer = flashinfer
        self.variants = variants
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.q_dtype, self.kv_dtype, self.device = q_dtype, kv_dtype, device
        self.use_tensor_cores = num_q_heads // num_kv_heads >= 4  # GQA groups of 4+ decode faster on MMA
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._prefill: dict[tuple, object] = {}
        self._decode: dict[tuple, object] = {}
        self._graph_decode: dict[tuple[int, tuple], object] = {}
        self._current: dict[tuple, object] = {}

    # ---- wrappers -----------------------------------------------------------------------------------------
    def _prefill_wrapper(self, key: tuple):
        if key not in self._prefill:
            self._prefill[key] = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        return self._prefill[key]

    def _decode_wrapper(self, key: tuple, bucket: int | None):
        if bucket is None:
            if key not in self._decode:
                self._decode[key] = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores
                )
            return self._decode[key]
        if (bucket, key) not in self._graph_decode:
            i32 = dict(dtype=torch.int32, device=self.device)
            self._graph_decode[(bucket, key)] = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=self.use_tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(bucket + 1, **i32),
                paged_kv_indices_buffer=torch.zeros(bucket * self.max_pages_per_seq, **i32),
                paged_kv_last_page_len_buffer=torch.zeros(bucket, **i32),
            )
        return self._graph_decode[(bucket, key)]

    def wrapper(self, key: tuple):
        """The planned wrapper of ``key`` for the current step (called by each layer's op)."""
        try:
            return self._current[key]
        except KeyError:
            raise RuntimeError(f"FlashInfer: attention variant {key} was not planned for this step") from None

    # ---- planning -----------------------------------------------------------------------------------------
    def plan(self, layout: StepLayout) -> None:
        paged = paged_layout(layout, self.page_size)
        dims = dict(num_qo_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads, page_size=self.page_size)
        types = dict(q_data_type=self.q_dtype, kv_data_type=self.kv_dtype)
        current = {}
        for key in self.variants:
            scale, window, cap, _ = key
            params = dict(sm_scale=scale, window_left=window - 1 if window > 0 else -1, logits_soft_cap=cap or None)
            if layout.num_prefill > 0:
                wrapper = self._prefill_wrapper(key)
                wrapper.plan(
                    torch.from_numpy(layout.cu_seqlens.astype(np.int32)),
                    paged.kv_indptr,
                    paged.kv_indices,
                    paged.kv_last_page_len,
                    head_dim_qk=self.head_dim,
                    causal=True,
                    **dims,
                    **types,
                    **params,
                )
            else:
                wrapper = self._decode_wrapper(key, layout.graph_bucket)
                wrapper.plan(
                    paged.kv_indptr,
                    paged.kv_indices,
                    paged.kv_last_page_len,
                    head_dim=self.head_dim,
                    **dims,
                    **types,
                    **params,
                )
            current[key] = wrapper
        self._current = current
        set_active_planner(self)


def make_planner(gm: GraphModule, spec, device: torch.device, page_size: int, max_pages_per_seq: int, kv_dtype):
    """The planner for a graph whose attention runs on FlashInfer (``spec``: the runner's ``KVCacheSpec``)."""
    layer = spec.layers[0]
    return FlashInferPlanner(
        attention_variants(gm),
        num_q_heads=layer.num_q_heads,
        num_kv_heads=layer.num_kv_heads,
        head_dim=layer.head_dim,
        page_size=page_size,
        max_pages_per_seq=max_pages_per_seq,
        q_dtype=layer.dtype,
        kv_dtype=kv_dtype,
        device=device,
    )
