"""The memory ceiling the benches measure a card against: a device-to-device copy, bytes read + written per second."""

from __future__ import annotations

import time

import torch


def copy_bytes_per_s(device: torch.device | str = "cuda", elements: int = 1 << 29) -> float:
    """Copy of ``elements`` float16 values (1 GiB by default) on ``device``: bytes read + written per second (on
    CUDA the median of Triton's ``do_bench``; elsewhere one timed copy, for smoke runs)."""
    src = torch.empty(elements, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    if src.is_cuda:
        from triton.testing import do_bench

        seconds = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median") * 1e-3
    else:
        start = time.perf_counter()
        dst.copy_(src)
        seconds = time.perf_counter() - start
    return 2 * src.numel() * src.element_size() / seconds
