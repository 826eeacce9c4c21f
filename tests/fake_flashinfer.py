"""A stand-in for the ``flashinfer`` package on CPU: its two paged wrappers, computed in torch.

Each wrapper attends using only what was planned (``kv_indptr``, ``kv_indices``, ``kv_last_page_len`` and, for
prefill, ``qo_indptr``), so a wrong paged layout from our planner gives wrong outputs. Queries sit at the end of
their sequence's keys (FlashInfer's causal alignment). CUDA-graph wrappers check their fixed batch size like the
real ones.
"""

from __future__ import annotations

import torch

from autodeploy.custom_ops.attention import attention_reference


class _PagedWrapper:
    def __init__(self, workspace: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False, **buffers):
        assert kv_layout == "NHD"
        self.use_cuda_graph = use_cuda_graph
        self.fixed_batch = len(buffers["paged_kv_last_page_len_buffer"]) if use_cuda_graph else None
        self.plans = 0

    def _plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, page_size, sm_scale, window_left, cap):
        batch = len(last_page_len)
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise ValueError(f"batch {batch} != the CUDA-graph batch {self.fixed_batch}")
        assert kv_indptr.dtype == kv_indices.dtype == last_page_len.dtype == torch.int32
        self.qo_indptr = qo_indptr.tolist()
        self.kv_indptr, self.kv_indices, self.last = kv_indptr.tolist(), kv_indices.tolist(), last_page_len.tolist()
        self.page_size, self.scale, self.cap = page_size, sm_scale, cap
        self.window = window_left + 1 if window_left >= 0 else None
        self.plans += 1

    def run(self, q, paged_kv_cache, k_scale=None, v_scale=None):
        k_cache, v_cache = paged_kv_cache
        out = torch.full((*q.shape[:-1], v_cache.shape[-1]), float("nan"), dtype=q.dtype)
        for s in range(len(self.last)):
            pages = self.kv_indices[self.kv_indptr[s] : self.kv_indptr[s + 1]]
            kv_len = (len(pages) - 1) * self.page_size + self.last[s]
            keys = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:kv_len].float() * (k_scale or 1.0)
            values = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:kv_len].float() * (v_scale or 1.0)
            lo, hi = self.qo_indptr[s], self.qo_indptr[s + 1]
            positions = torch.arange(kv_len)
            out[lo:hi] = attention_reference(
                q[lo:hi].unsqueeze(0),
                keys.to(q.dtype).unsqueeze(0),
                values.to(q.dtype).unsqueeze(0),
                self.scale,
                self.window,
                self.cap,
                q_positions=positions[kv_len - (hi - lo) :],
                k_positions=positions,
            )[0]
        return out


class BatchPrefillWithPagedKVCacheWrapper(_PagedWrapper):
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, *, num_qo_heads,
             num_kv_heads, page_size, head_dim_qk, causal, q_data_type, kv_data_type, sm_scale=None,
             window_left=-1, logits_soft_cap=None):  # fmt: skip
        assert causal and qo_indptr.dtype == torch.int32
        self._plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, page_size, sm_scale,
                   window_left, logits_soft_cap)  # fmt: skip


class BatchDecodeWithPagedKVCacheWrapper(_PagedWrapper):
    def __init__(self, workspace, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False, **buffers):
        super().__init__(workspace, kv_layout, use_cuda_graph, **buffers)

    def plan(self, indptr, indices, last_page_len, *, num_qo_heads, num_kv_heads, head_dim, page_size,
             q_data_type, kv_data_type, sm_scale=None, window_left=-1, logits_soft_cap=None):  # fmt: skip
        one_each = torch.arange(len(last_page_len) + 1, dtype=torch.int32)
        self._plan(one_each, indptr, indices, last_page_len, page_size, sm_scale, window_left, logits_soft_cap)
