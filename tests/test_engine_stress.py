"""200 requests of random lengths against a KV pool small enough to force preemption."""

from __future__ import annotations

import random

from autodeploy.models.tiny import tiny_model
from engine_utils import build_engine, greedy, random_prompts


def test_stress_preemption_matches_requests_run_alone():
    model = tiny_model("llama", num_hidden_layers=1)
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    max_tokens = [rng.randint(1, 12) for _ in range(200)]
    prompts = random_prompts(lengths, model.config.vocab_size, seed=5)
    engine = build_engine(model, max_batch_size=32, max_num_tokens=128, **{"kv_cache.max_tokens": 96})
    together = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert engine.scheduler.num_preemptions > 0
    assert all(o.finished for o in together)
    alone = build_engine(model, max_batch_size=1, max_num_tokens=128)
    for prompt, n, output in zip(prompts, max_tokens, together):
        expected = alone.generate([prompt], greedy(n))[0].outputs[0]
        assert output.outputs[0].token_ids == expected.token_ids
        assert output.outputs[0].finish_reason == expected.finish_reason
