"""The runner's step inputs in one device buffer: laid out per step shape, uploaded with one copy of their bytes.

A step's integer inputs (token ids, positions, cache slots, logits rows, sequence lengths, cache lengths, the
page table, and the rows that take tokens still on the device) lie back to back at 16-byte-aligned offsets that
depend only on the step's sizes (``tokens``, ``seqs``, ``logits``, ``fills``). So one host-to-device copy moves
exactly the step's bytes (a batch-1 decode step: under 1 KB), and a CUDA graph captured for a shape finds its
inputs at the same device addresses on every replay. The graph's inputs come first, so ``fills`` moves nothing
a graph reads.

The pinned host side alternates between two buffers from one step to the next: a step's upload is queued
behind the previous step's GPU work, and the next step is packed before that upload has surely run.
"""

from __future__ import annotations

import torch

from ..transforms.gather_logits import LOGITS_INDICES

ALIGN = 16  # bytes: every region starts where Triton's divisibility hint and vector loads want it

#: (name, dtype, element count as a function of (tokens, seqs, logits, fills, pages per sequence))
REGIONS = (
    ("input_ids", torch.int64, lambda t, s, l, f, p: t),
    ("position_ids", torch.int64, lambda t, s, l, f, p: t),
    ("slot_mapping", torch.int64, lambda t, s, l, f, p: t),
    (LOGITS_INDICES, torch.int64, lambda t, s, l, f, p: l),
    ("seq_lens", torch.int32, lambda t, s, l, f, p: s),
    ("cu_seqlens", torch.int32, lambda t, s, l, f, p: s + 1),
    ("cache_lens", torch.int32, lambda t, s, l, f, p: s),
    ("page_table", torch.int32, lambda t, s, l, f, p: s * p),
    ("fill_rows", torch.int64, lambda t, s, l, f, p: f),
    ("fill_sources", torch.int64, lambda t, s, l, f, p: f),
)

Layout = dict[str, tuple[int, int, torch.dtype]]  # name -> (byte offset, elements, dtype)


def step_layout(tokens: int, seqs: int, logits: int, fills: int, pages: int) -> tuple[Layout, int]:
    """Each region's offset, length and dtype for a step of these sizes, and the bytes they span."""
    layout: Layout = {}
    end = 0
    for name, dtype, count in REGIONS:
        n = count(tokens, seqs, logits, fills, pages)
        layout[name] = (end, n, dtype)
        end += -(-n * dtype.itemsize // ALIGN) * ALIGN
    return layout, end


class StepBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_pages: int, device: torch.device):
        self.max_pages = max_pages
        _, capacity = step_layout(max_tokens, max_seqs, max_seqs, max_seqs, max_pages)
        on_gpu = device.type == "cuda"
        self._hosts = [torch.zeros(capacity, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2 if on_gpu else 1)]
        self._turn = 0
        self._device = torch.zeros(capacity, dtype=torch.uint8, device=device) if device.type != "cpu" else None
        self._layout: Layout = {}
        self._end = 0

    def begin(self, tokens: int, seqs: int, logits: int, fills: int = 0) -> None:
        """Start packing a step of these sizes (on the other host buffer than the previous step's)."""
        self._turn = (self._turn + 1) % len(self._hosts)
        self._layout, self._end = step_layout(tokens, seqs, logits, fills, self.max_pages)

    def host(self, name: str) -> torch.Tensor:
        return self._view(self._hosts[self._turn], self._layout[name])

    def device(self, name: str) -> torch.Tensor:
        """The device view of ``name`` in the step being packed."""
        buffer = self._device if self._device is not None else self._hosts[self._turn]
        return self._view(buffer, self._layout[name])

    def upload(self) -> None:
        """One copy of the packed bytes to the device, queued on the current stream."""
        if self._device is not None and self._end:
            self._device[: self._end].copy_(self._hosts[self._turn][: self._end], non_blocking=True)

    @staticmethod
    def _view(buffer: torch.Tensor, region: tuple[int, int, torch.dtype]) -> torch.Tensor:
        offset, n, dtype = region
        return buffer[offset : offset + n * dtype.itemsize].view(dtype)
