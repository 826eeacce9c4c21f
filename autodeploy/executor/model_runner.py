"""Runs the cached graph on one step's batch: packs inputs, runs eagerly or replays a CUDA graph, returns logits.

The runner owns the step buffers (``step_buffers.py``): a step packs its integer inputs into pinned host memory
at offsets that depend only on its shape, copies them to the device once, and calls the graph on views of the
device buffer, whose addresses are the same for the same shape — so decode-only steps, and prefill-only steps of
at most ``PREFILL_GRAPH_SEQS`` sequences and ``prefill_cuda_graph_tokens`` tokens, replay CUDA graphs captured
on them.

A prefill graph's step is padded to its bucket: sequences of no tokens up to ``PREFILL_GRAPH_SEQS``, then tokens
that belong to no sequence (slot -1, never attended to) up to the bucket's count, which ``batch_info`` reports
as the prefill token count so the attention's launch grid covers the bucket; the logits rows of the padding are
ignored.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

import torch
from torch.fx import GraphModule

from ..custom_ops.attention_backends import make_step_planner
from ..custom_ops.step_layout import StepLayout
from ..transforms.gather_logits import LOGITS_INDICES
from ..transforms.insert_cached_attention import KVCacheSpec
from .cuda_graphs import CUDAGraphRunner, bucket_sizes, prefill_bucket_sizes
from .step_buffers import StepBuffers

logger = logging.getLogger("autodeploy.executor")

PREFILL_GRAPH_SEQS = 8  # sequences a prefill graph takes (a step with more runs eagerly)


@dataclass
class TokenFill:
    """Input tokens not known on the host yet: entry ``entry_indices[j]``'s last new token is
    ``tokens[source_rows[j]]``, a device tensor the previous step's sampler produced (asynchronous scheduling)."""

    entry_indices: list[int]
    source_rows: list[int]
    tokens: torch.Tensor


@dataclass
class StepEntry:
    """One sequence's share of a step: feed ``token_ids`` at positions ``start_pos...``; sample after the last."""

    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool


class ModelRunner:
    def __init__(
        self,
        gm: GraphModule,
        spec: KVCacheSpec,
        kv_caches: list[torch.Tensor],
        *,
        device: torch.device,
        block_size: int,
        max_num_tokens: int,
        max_batch_size: int,
        max_seq_len: int,
    ):
        self.gm = gm
        self.spec = spec
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.max_pages = (max_seq_len + block_size - 1) // block_size
        self.buffers = StepBuffers(max_num_tokens, max_batch_size, self.max_pages, device)
        self.batch_info = torch.zeros(3, dtype=torch.int32)  # stays on the host by contract
        self.cache_inputs = {}
        for i in range(len(spec.layers)):
            self.cache_inputs[f"k_cache_{i}"] = kv_caches[2 * i]
            self.cache_inputs[f"v_cache_{i}"] = kv_caches[2 * i + 1]
        self.cuda_graphs: CUDAGraphRunner | None = None
        self.prefill_graphs: CUDAGraphRunner | None = None
        self.prefill_graph_seqs = min(PREFILL_GRAPH_SEQS, max_batch_size)
        self.attention_planner = make_step_planner(gm, spec, kv_caches, device, block_size, self.max_pages)

    # ---- input packing ------------------------------------------------------------------------------------
    def _pack(
        self, entries: list[StepEntry], num_prefill: int, pad_to: int | None = None, fill: TokenFill | None = None,
        prefill_pad: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fill the host regions for ``entries`` (prefills first), upload, and return the graph's inputs.

        Sequences past ``len(entries)`` up to ``pad_to`` are CUDA-graph padding: one dummy token each, written
        nowhere (slot -1), its logits row ignored. ``prefill_pad = (seqs, tokens)`` pads a prefill-only step for a
        prefill graph instead (see the module docstring); its logits rows are the sampled entries', then filler.
        """
        num_seqs = len(entries)
        padded_seqs = max(pad_to or num_seqs, num_seqs)
        pad_len = 1
        if prefill_pad is not None:
            padded_seqs, pad_len, num_prefill = max(prefill_pad[0], num_seqs), 0, max(prefill_pad[0], num_seqs)
        token_lists = [e.token_ids for e in entries]
        tables = [e.block_ids for e in entries]
        lens = np.fromiter(map(len, token_lists), dtype=np.int64, count=num_seqs)
        starts = np.array([e.start_pos for e in entries], dtype=np.int64)
        lens = np.concatenate([lens, np.full(padded_seqs - num_seqs, pad_len, dtype=np.int64)])
        starts = np.concatenate([starts, np.zeros(padded_seqs - num_seqs, dtype=np.int64)])
        num_tokens = int(lens.sum())
        cu = np.zeros(padded_seqs + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        seq_of_token = np.repeat(np.arange(padded_seqs), lens)
        positions = starts[seq_of_token] + (np.arange(num_tokens) - cu[:-1][seq_of_token])

        extra = max(0, prefill_pad[1] - num_tokens) if prefill_pad is not None else 0  # tokens of no sequence
        sample = np.ones(padded_seqs, dtype=bool)
        sample[:num_seqs] = np.array([e.sample for e in entries], dtype=bool)
        if prefill_pad is not None:  # a fixed count of rows: the sampled entries', then row 0
            sampled = (cu[1:] - 1)[:num_seqs][sample[:num_seqs]]
            sample_rows = np.concatenate([sampled, np.zeros(padded_seqs - len(sampled), dtype=np.int64)])
        else:
            sample_rows = (cu[1:] - 1)[sample]
        fill_rows = np.zeros(0, dtype=np.int64)
        if fill is not None:  # each fill entry's last new token
            fill_rows = cu[np.asarray(fill.entry_indices, dtype=np.int64) + 1] - 1
        buffers = self.buffers
        buffers.begin(num_tokens + extra, padded_seqs, len(sample_rows), len(fill_rows))

        page_table = buffers.host("page_table").numpy()  # [padded_seqs * max_pages]
        page_table[:] = 0
        table_lens = np.fromiter(map(len, tables), dtype=np.int64, count=num_seqs)
        if num_seqs and table_lens.max() > self.max_pages:
            raise IndexError(f"a block table of {table_lens.max()} blocks, but the page table has {self.max_pages}")
        table_ends = np.cumsum(table_lens)
        num_table_blocks = int(table_ends[-1]) if num_seqs else 0
        # where each block goes in the flat page table: its row's start plus its place in the row
        row_shift = np.arange(num_seqs) * self.max_pages - (table_ends - table_lens)
        page_table[np.arange(num_table_blocks) + np.repeat(row_shift, table_lens)] = np.fromiter(
            itertools.chain.from_iterable(tables), dtype=page_table.dtype, count=num_table_blocks
        )
        pages = page_table.reshape(padded_seqs, self.max_pages)
        bs = self.block_size
        slots = pages[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        slots[cu[num_seqs] :] = -1

        buffers.host("input_ids").numpy()[:] = (
            list(itertools.chain.from_iterable(token_lists))
            + [0] * (num_tokens + extra - int(cu[num_seqs]))
        )
        buffers.host("position_ids").numpy()[:] = np.concatenate([positions, np.zeros(extra, dtype=np.int64)])
        buffers.host("slot_mapping").numpy()[:] = np.concatenate([slots, np.full(extra, -1, dtype=np.int64)])
        buffers.host("seq_lens").numpy()[:] = lens
        buffers.host("cu_seqlens").numpy()[:] = cu
        buffers.host("cache_lens").numpy()[:] = starts
        buffers.host(LOGITS_INDICES).numpy()[:] = sample_rows
        self.batch_info[0] = num_prefill
        self.batch_info[1] = int(cu[num_prefill]) + extra
        self.batch_info[2] = padded_seqs - num_prefill
        if fill is not None:
            buffers.host("fill_rows").numpy()[:] = fill_rows
            buffers.host("fill_sources").numpy()[:] = fill.source_rows
        buffers.upload()
        if self.attention_planner is not None:  # backends that plan on the host before the graph runs
            self.attention_planner.plan(StepLayout(lens, starts, cu, pages, num_prefill, pad_to))
        inputs = self._graph_inputs()
        if fill is not None:  # tokens sampled by the previous step, still on the device
            n = len(fill.source_rows)
            in_place = np.arange(n)
            if np.array_equal(fill_rows, in_place) and np.array_equal(fill.source_rows, in_place):
                # decode after decode: row j takes token j
                inputs["input_ids"].view(-1)[:n].copy_(fill.tokens[:n])
            else:
                inputs["input_ids"].view(-1)[buffers.device("fill_rows")] = fill.tokens[buffers.device("fill_sources")]
        return inputs

    def _graph_inputs(self) -> dict[str, torch.Tensor]:
        """Device views of the step just packed, shaped for the graph (the same addresses for the same shape)."""
        view = self.buffers.device
        return {
            "input_ids": view("input_ids").view(1, -1),
            "position_ids": view("position_ids").view(1, -1),
            "seq_lens": view("seq_lens"),
            "cu_seqlens": view("cu_seqlens"),
            "cache_lens": view("cache_lens"),
            "page_table": view("page_table").view(-1, self.max_pages),
            "slot_mapping": view("slot_mapping"),
            "batch_info": self.batch_info,
            **self.cache_inputs,
            LOGITS_INDICES: view(LOGITS_INDICES),
        }

    # ---- running ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(
        self, prefills: list[StepEntry], decodes: list[StepEntry], fill: TokenFill | None = None
    ) -> torch.Tensor:
        """Logits ``[N, V]`` for the entries with ``sample=True``, in entry order (prefills, then decodes).

        ``fill`` supplies input tokens that are still on the device (their host value is a placeholder).
        """
        entries = prefills + decodes
        if not prefills and self.cuda_graphs is not None:
            bucket = self.cuda_graphs.bucket_for(len(decodes))
            if bucket is not None:
                inputs = self._pack(entries, 0, pad_to=bucket, fill=fill)
                return self.cuda_graphs.replay(bucket, inputs)[: len(decodes)]
        if not decodes and self.prefill_graphs is not None and len(prefills) <= self.prefill_graph_seqs:
            bucket = self.prefill_graphs.bucket_for(sum(len(e.token_ids) for e in prefills))
            if bucket is not None and (fill is None or not fill.entry_indices):
                inputs = self._pack(prefills, len(prefills), prefill_pad=(self.prefill_graph_seqs, bucket))
                return self.prefill_graphs.replay(bucket, inputs)[: sum(bool(e.sample) for e in prefills)]
        inputs = self._pack(entries, len(prefills), fill=fill)
        return self.gm(**inputs)[0]

    def capture_cuda_graphs(self, max_batch: int, prefill_tokens: int = 0) -> None:
        """Capture decode steps for the bucket sizes up to ``max_batch``, and prefill-only steps up to
        ``prefill_tokens`` tokens (CUDA and graph-safe backends only; prefill graphs only without host planning)."""
        if self.device.type != "cuda" or not self.spec.cuda_graph_safe:
            return
        self.cuda_graphs = CUDAGraphRunner(self.gm, bucket_sizes(min(max_batch, self.max_batch_size)))
        self.cuda_graphs.capture(lambda bucket: self._pack([], 0, pad_to=bucket))
        sizes = prefill_bucket_sizes(min(prefill_tokens, self.max_num_tokens))
        if sizes and self.attention_planner is None:
            seqs = self.prefill_graph_seqs
            self.prefill_graphs = CUDAGraphRunner(self.gm, sizes, "prefill tokens", pool=self.cuda_graphs.pool)
            self.prefill_graphs.capture(lambda bucket: self._pack([], seqs, prefill_pad=(seqs, bucket)))

    def release_cuda_graphs(self) -> None:
        """Drop the captured graphs once the GPU is idle: tensor-parallel ranks do it before leaving their process
        groups, since the graphs hold the communicators' kernels (decode replays fall back to eager after it)."""
        if self.cuda_graphs is not None:
            torch.cuda.synchronize(self.device)
            self.cuda_graphs = self.prefill_graphs = None
