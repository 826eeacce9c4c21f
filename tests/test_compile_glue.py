"""``torch_compile.enabled``: the cached graph's glue compiled by torch.compile gives Hugging Face's tokens."""

from __future__ import annotations

import torch

from autodeploy.models.tiny import tiny_model
from engine_utils import build_engine, greedy, hf_greedy, random_prompts


def test_compiled_glue_gives_hf_greedy_tokens():
    torch._dynamo.reset()
    model = tiny_model("llama")
    engine = build_engine(model, **{"torch_compile.enabled": True, "torch_compile.backend": "aot_eager"})
    assert isinstance(engine.runner.gm, torch._dynamo.eval_frame.OptimizedModule)
    prompts = random_prompts([3, 17, 41], model.config.vocab_size)
    outputs = engine.generate(prompts, greedy(8))
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, 8)
