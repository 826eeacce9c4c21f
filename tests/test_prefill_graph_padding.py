"""Prefill-only steps padded for a CUDA graph (``ModelRunner._pack(prefill_pad=...)``) give the unpadded logits.

The graphs themselves need a GPU (``bench/e2e.py`` measures them); here the padded inputs run eagerly: sequences of
no tokens, then tokens of no sequence (slot -1) up to the bucket, with the bucket as the prefill token count.
"""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.executor.cuda_graphs import CUDAGraphRunner, prefill_bucket_sizes
from autodeploy.executor.model_runner import StepEntry
from autodeploy.models.tiny import tiny_model
from engine_utils import build_engine, greedy, hf_greedy, random_prompts


def test_prefill_buckets():
    assert prefill_bucket_sizes(2048) == [128, 256, 512, 1024, 2048]
    assert prefill_bucket_sizes(300) == [128, 256]
    assert prefill_bucket_sizes(0) == []


@pytest.mark.parametrize("attn_backend", ["torch", "triton"])
def test_padded_prefill_step_equals_the_unpadded_one(attn_backend):
    model = tiny_model("llama")
    engine = build_engine(model, device="cpu", attn_backend=attn_backend, max_batch_size=4)
    runner = engine.runner
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(7)

    def entry(n: int, start: int, first_block: int, sample: bool) -> StepEntry:
        blocks = list(range(first_block, first_block + (start + n + 15) // 16))
        return StepEntry(torch.randint(3, vocab, (n,), generator=gen).tolist(), start, blocks, sample)

    # a fresh prompt, a non-final chunk (not sampled), and a chunk after cached context
    prefills = [entry(5, 0, 0, True), entry(9, 0, 2, False), entry(7, 16, 4, True)]
    caches_before = [c.clone() for c in runner.kv_caches]
    expected = runner.execute(prefills, [])
    assert expected.shape[0] == 2
    caches_after = [c.clone() for c in runner.kv_caches]
    for cache, before in zip(runner.kv_caches, caches_before):
        cache.copy_(before)
    inputs = runner._pack(prefills, len(prefills), prefill_pad=(4, 64))
    assert inputs["input_ids"].shape == (1, 64) and inputs["seq_lens"].shape == (4,)
    assert runner.batch_info.tolist() == [4, 64, 0]
    got = runner.gm(**inputs)[0]
    assert got.shape[0] == 4  # the sampled rows, then filler
    torch.testing.assert_close(got[:2], expected, atol=1e-5, rtol=1e-5)
    for cache, after in zip(runner.kv_caches, caches_after):  # padding wrote nothing
        assert torch.equal(cache, after)


class _EagerPrefillGraphs:
    """Stands in for the prefill ``CUDAGraphRunner`` on CPU: a "replay" runs the graph on the padded inputs."""

    bucket_for = CUDAGraphRunner.bucket_for

    def __init__(self, gm, buckets: list[int]):
        self.gm, self.buckets, self.graphs, self.replays = gm, buckets, dict.fromkeys(buckets), []

    def replay(self, bucket: int, inputs: dict) -> torch.Tensor:
        assert inputs["input_ids"].shape == (1, bucket)
        self.replays.append(bucket)
        return self.gm(**inputs)[0]


def test_engine_prefills_through_the_graph_path_equal_hf():
    """Prefill-only steps take the padded path (chosen bucket, sampled rows trimmed); decode steps stay eager."""
    model = tiny_model("llama")
    engine = build_engine(model, device="cpu", attn_backend="triton", max_batch_size=4)
    graphs = _EagerPrefillGraphs(engine.runner.gm, [16, 64])
    engine.runner.prefill_graphs = graphs
    prompts = random_prompts([9, 30, 5], model.config.vocab_size, seed=8)
    outs = engine.generate(prompts, greedy(5))
    assert graphs.replays and set(graphs.replays) <= {16, 64}
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model, p, 5) for p in prompts]
