"""The engine's warm-up steps (run at build on CUDA so kernels compile before the first request)."""

from __future__ import annotations

import torch

from autodeploy.config import AutoDeployConfig
from autodeploy.executor.engine_setup import warm_up


class RecordingRunner:
    def __init__(self, num_blocks: int):
        self.kv_caches = [torch.empty(num_blocks, 1)]
        self.device = torch.device("cpu")
        self.steps = []

    def execute(self, prefills, decodes):
        self.steps.append((prefills, decodes))


def test_warm_up_prefills_every_size_class_up_to_max_num_tokens():
    config = AutoDeployConfig(max_num_tokens=1000, max_batch_size=8)
    runner = RecordingRunner(num_blocks=40)
    warm_up(runner, config, max_seq_len=300)
    prefill_only = [sum(len(e.token_ids) for e in p) for p, d in runner.steps if p and not d]
    assert [64, 128, 256, 512, 1000] == prefill_only[-5:]
    assert any(d and not p for p, d in runner.steps) and any(p and d for p, d in runner.steps)
    for prefills, decodes in runner.steps:
        for entry in prefills + decodes:
            assert len(entry.token_ids) <= 299  # every sequence fits max_seq_len
            assert all(0 <= b < 40 for b in entry.block_ids)
            assert len(entry.block_ids) * config.kv_cache.block_size >= len(entry.token_ids) + entry.start_pos


def test_warm_up_steps_stay_within_max_batch_size():
    config = AutoDeployConfig(max_num_tokens=1000, max_batch_size=2)
    runner = RecordingRunner(num_blocks=40)
    warm_up(runner, config, max_seq_len=100)
    assert max(len(p) + len(d) for p, d in runner.steps) <= 2
