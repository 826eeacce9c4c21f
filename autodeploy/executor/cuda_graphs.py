"""CUDA graphs of whole steps, keyed by a padded size: decode steps by batch size (buckets 1, 2, 4, 8, then
multiples of 16), prefill-only steps by token count (powers of two from ``PREFILL_MIN_TOKENS``).

The model runner owns the static input buffers; ``capture`` asks it for the inputs of each bucket (views of
those buffers), runs the graph once to warm up, and captures it. ``replay`` assumes the runner has written
the step's inputs into the same buffers and returns the captured logits. Every runner of one model runner
captures into one memory pool (their graphs never run at the same time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.fx import GraphModule
from tqdm.auto import tqdm

logger = logging.getLogger("autodeploy.executor")


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


PREFILL_MIN_TOKENS = 128


def prefill_bucket_sizes(max_tokens: int) -> list[int]:
    sizes, size = [], PREFILL_MIN_TOKENS
    while size <= max_tokens:
        sizes.append(size)
        size *= 2
    return sizes


class CUDAGraphRunner:
    def __init__(self, gm: GraphModule, buckets: list[int], what: str = "decode batch sizes", pool=None):
        self.gm = gm
        self.buckets = buckets
        self.what = what
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = pool

    def bucket_for(self, batch: int) -> int | None:
        for size in self.buckets:
            if size >= batch and size in self.graphs:
                return size
        return None

    @torch.inference_mode()
    def capture(self, inputs_for: Callable[[int], dict[str, torch.Tensor]]) -> None:
        stream = torch.cuda.Stream()
        for bucket in tqdm(sorted(self.buckets, reverse=True), desc=f"Capturing CUDA graphs ({self.what})",
                           disable=None):
            inputs = inputs_for(bucket)
            torch.cuda.synchronize()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.gm(**inputs)  # warm-up: autotuning and lazy initialisation stay out of the graph
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.gm(**inputs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bucket] = graph
            self.outputs[bucket] = out[0]
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for %s %s", self.what, self.buckets)

    def replay(self, bucket: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.graphs[bucket].replay()
        return self.outputs[bucket]
