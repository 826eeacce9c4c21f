"""The host-side layout of one step, for attention backends that plan on the host before the graph runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepLayout:
    """One step's batch as the runner packed it (host arrays; prefill sequences first, padding last)."""

    seq_lens: np.ndarray  # [B] new tokens per sequence
    cache_lens: np.ndarray  # [B] tokens already cached per sequence
    cu_seqlens: np.ndarray  # [B + 1]
    page_table: np.ndarray  # [B, P] block ids
    num_prefill: int
    graph_bucket: int | None  # the CUDA-graph bucket this decode step replays (or captures), else None
