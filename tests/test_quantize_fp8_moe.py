"""``quantize_fp8_moe``: fp8 expert weights with per-row scales, from the flag, in memory and while loading.

The quantized graph must compute what the model computes with each expert weight replaced by its
dequantized codes (``codes * scale``), so float32 logits agree closely; the engine's greedy tokens then equal Hugging
Face's on that dequantized model, through the Triton fused MoE (the interpreter on CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops)
from autodeploy.config import build_config
from autodeploy.models import ModelFactory
from autodeploy.models.tiny import tiny_model
from autodeploy.transforms import Stage
from autodeploy.transforms.graph import find_nodes, op_arguments
from autodeploy.transforms.pipeline import export_and_transform
from engine_utils import build_engine, greedy, hf_greedy, random_prompts
from transform_harness import eager_logits, random_inputs

ops = torch.ops.autodeploy
BEFORE_CACHE = [s for s in Stage if s.order < Stage.CACHE_INIT.order]
LENGTHS, MAX_TOKENS = [5, 13], [8, 3]  # the last steps decode one sequence alone
EXPERTS_ONLY = {"quantize": "fp8", "transforms.quantize_fp8_linear.enabled": False}
# where each model keeps its experts' output rows: qwen3 / mixtral [E, U, H] (rows), gpt-oss [E, H, U] (columns)
ROW_DIM = {"qwen3_moe": 1, "mixtral": 1, "gpt_oss": 2}


def _dequantized(model: torch.nn.Module, gm: torch.fx.GraphModule, row_dim: int) -> torch.nn.Module:
    """``model`` with every expert weight replaced by the graph's ``codes * scale``."""
    ref = copy.deepcopy(model)
    params = dict(gm.named_parameters())
    state = ref.state_dict()
    for name in [n for n in params if n.endswith("_scale")]:
        codes, scale = params[name.removesuffix("_scale")], params[name]
        state[name.removesuffix("_scale")] = codes.float() * scale.unsqueeze(3 - row_dim)
    ref.load_state_dict(state)
    return ref


def _quantized(model: torch.nn.Module, **overrides) -> torch.fx.GraphModule:
    gm, _ = export_and_transform(ModelFactory(model, device="cpu"), build_config({**EXPERTS_ONLY, **overrides}),
                                 stages=BEFORE_CACHE)
    return gm


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_experts_become_fp8_and_compute_the_dequantized_model(model_type):
    model = tiny_model(model_type)
    gm = _quantized(model)
    moes = find_nodes(gm, [ops.torch_moe, ops.triton_moe])
    assert len(moes) == model.config.num_hidden_layers
    for moe in moes:
        args = op_arguments(moe)
        w_up = gm.get_parameter(args["w_up"].target if args["w_up"].op == "get_attr" else args["w_up"].args[0].target)
        assert w_up.dtype == torch.float8_e4m3fn
        assert gm.get_parameter(args["w_up_scale"].target).shape == (w_up.shape[0], w_up.shape[ROW_DIM[model_type]])
    ids, pos = random_inputs(2, 9, model.config.vocab_size)
    reference = eager_logits(_dequantized(model, gm, ROW_DIM[model_type]), ids, pos)
    torch.testing.assert_close(gm(ids, pos), reference, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(reference, eager_logits(model, ids, pos), atol=2e-5, rtol=2e-5)  # it did quantize


def test_exclude_and_other_flags():
    model = tiny_model("qwen3_moe")
    gm = _quantized(model, **{"transforms.quantize_fp8_moe.exclude": ["model.layers.0.*"]})
    assert [n for n, p in gm.named_parameters() if p.dtype == torch.float8_e4m3fn] == [
        "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    gm = _quantized(model, quantize="int8_weight_only")
    assert not any(n.endswith("_scale") and "experts" in n for n, _ in gm.named_parameters())


def test_checkpoint_folder_quantizes_while_loading(tmp_path):
    """Meta expert weights get load hooks; the result equals quantizing the same weights in memory."""
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    in_memory = _quantized(model)
    gm, _ = export_and_transform(ModelFactory(tmp_path, device="cpu"), build_config(EXPERTS_ONLY), stages=BEFORE_CACHE)
    ids, pos = random_inputs(2, 9, model.config.vocab_size)
    assert gm.get_parameter("model.layers.0.mlp.experts.down_proj").dtype == torch.float8_e4m3fn
    torch.testing.assert_close(gm(ids, pos), in_memory(ids, pos), atol=1e-6, rtol=1e-6)


def test_engine_greedy_equals_hf_on_the_dequantized_model():
    """The whole engine with the Triton fused MoE on fp8 experts (the interpreter on CPU): prefill, batched and
    single-token decode."""
    model = tiny_model("qwen3_moe")
    reference = _dequantized(model, _quantized(model), ROW_DIM["qwen3_moe"])
    engine = build_engine(model, **EXPERTS_ONLY, **{"transforms.fuse_moe.backend": "triton"})
    assert len(find_nodes(engine.runner.gm, ops.triton_moe)) == model.config.num_hidden_layers
    prompts = random_prompts(LENGTHS, model.config.vocab_size, seed=5)
    outputs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    for prompt, n, output in zip(prompts, MAX_TOKENS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, n)


@pytest.mark.parametrize("flag", ["fp8", "int4_weight_only"])
def test_routers_stay_in_full_precision(flag):
    """The linears behind the experts' routing keep their weights (``quantize_router: true`` quantizes them too)."""
    model = tiny_model("qwen3_moe")
    gates = {f"model.layers.{i}.mlp.gate.weight" for i in range(model.config.num_hidden_layers)}
    gm = _quantized(model, quantize=flag, **{"transforms.quantize_fp8_linear.enabled": True})
    params = dict(gm.named_parameters())
    assert gates <= params.keys() and all(params[g].dtype == torch.float32 for g in gates)
    assert any(p.dtype != torch.float32 for n, p in params.items() if "self_attn" in n)
    gm = _quantized(model, quantize=flag, **{"transforms.quantize_fp8_linear.enabled": True,
                                            f"transforms.quantize_{flag.split('_')[0]}_linear.quantize_router": True})
    assert not [n for n, p in gm.named_parameters() if n in gates and p.dtype == torch.float32]
