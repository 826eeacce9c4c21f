"""The whole engine with ``fuse_moe`` forced to Triton (the interpreter on CPU) gives HF's greedy tokens.

Mixtral (export-routed experts) and Qwen3-MoE (renormalised top-k), float32. The prompts and token budgets make
every kernel path run: a multi-sequence prefill (aligned blocks of 64 rows), batched decode (16-row blocks)
and, once the shorter requests are done, single-token decode (the direct path without alignment).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine_utils import build_engine, greedy, hf_greedy, random_prompts  # noqa: E402

from autodeploy.models.tiny import tiny_model  # noqa: E402

ops = torch.ops.autodeploy
LENGTHS = [5, 13, 29]
MAX_TOKENS = [10, 3, 3]  # the last steps decode one sequence alone


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_triton_moe_engine_greedy_equals_hf(model_type):
    model = tiny_model(model_type)
    engine = build_engine(model, **{"transforms.fuse_moe.backend": "triton"})
    gm = engine.runner.gm
    layers = model.config.num_hidden_layers
    assert sum(n.target == ops.triton_moe.default for n in gm.graph.nodes) == layers
    assert not any(n.target == ops.torch_moe.default for n in gm.graph.nodes)

    prompts = random_prompts(LENGTHS, model.config.vocab_size, seed=3)
    outputs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    for prompt, n, output in zip(prompts, MAX_TOKENS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, n)
