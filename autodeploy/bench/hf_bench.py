"""The baseline: Hugging Face ``generate`` (eager, default attention) on the same model shapes."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .metrics import BenchReport
from .workload import SyntheticRequest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_hf_bench(model: torch.nn.Module, requests: list[SyntheticRequest], batch_size: int) -> BenchReport:
    """Static batches of ``batch_size`` same-length prompts through ``generate``; TTFT from a 1-token run."""
    device = next(model.parameters()).device
    osl = requests[0].output_len
    first = torch.tensor([requests[0].prompt_token_ids], device=device)
    model.generate(first, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    model.generate(first, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    _sync(device)
    ttft_ms = (time.perf_counter() - t0) * 1e3
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total_tokens, start = 0, time.perf_counter()
    for i in tqdm(range(0, len(requests), batch_size), desc="bench hf generate", disable=None):
        chunk = requests[i : i + batch_size]
        ids = torch.tensor([r.prompt_token_ids for r in chunk], device=device)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=osl, min_new_tokens=osl, do_sample=False
        )
        total_tokens += (out.shape[1] - ids.shape[1]) * len(chunk)
    _sync(device)
    elapsed = time.perf_counter() - start
    per_token_ms = (elapsed / max(1, (len(requests) + batch_size - 1) // batch_size)) / osl * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return BenchReport(
        name=f"hf generate (batch {batch_size})",
        num_requests=len(requests),
        output_tokens=total_tokens,
        elapsed_s=elapsed,
        ttft_p50_ms=ttft_ms,
        ttft_p99_ms=ttft_ms,
        itl_p50_ms=per_token_ms,
        itl_p99_ms=per_token_ms,
        peak_memory_gib=peak,
    )
