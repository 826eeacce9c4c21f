"""Tensor parallelism of quantized models on CPU: each rank's quantized linears are its slice of the unsharded
ones (codes, scales and zero points exactly), int4 row splits refuse to cut groups, and 2-rank engines (gloo)
give the 1-rank engine's greedy tokens for a model quantized from the flag while its checkpoint streams in, a
pre-quantized GPTQ checkpoint, and float8 linears with float8 experts. (The experts' shards: test_tensor_parallel.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch

import autodeploy
from autodeploy.config import build_config
from autodeploy.custom_ops.quant_linear import unpack_int4
from autodeploy.errors import TransformError
from autodeploy.models import ModelFactory
from autodeploy.models.tiny import tiny_model
from autodeploy.transforms import SharedContext, Stage
from autodeploy.transforms.graph import is_quantized_linear
from autodeploy.transforms.pipeline import build_transforms, export_and_transform, run_transforms
from engine_utils import greedy, random_prompts
from quant_checkpoints import write_quantized_checkpoint

SMALL = {"max_batch_size": 8, "max_seq_len": 128, "max_num_tokens": 256, "kv_cache.block_size": 4}
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "num_hidden_layers": 1}  # 128 input features a rank for o_proj: whole int4 chunks
FLAGS = {
    "fp8": {"quantize": "fp8"},
    "fp8-lm-head": {"quantize": "fp8", "transforms.quantize_fp8_linear.quantize_lm_head": True},  # vocab-parallel
    "int8": {"quantize": "int8_weight_only"},
    "int4-g64": {"quantize": "int4_weight_only", "transforms.quantize_int4_linear.group_size": 64},
    "int4-channel": {"quantize": "int4_weight_only", "transforms.quantize_int4_linear.group_size": -1},
}


def _rank_graphs(model, overrides: dict, world: int = 2):
    """The quantized graph of one rank, and each rank's sharding of a copy of it."""
    config = build_config({**SMALL, "tensor_parallel_size": world, **overrides})
    factory = ModelFactory(model, device="cpu")

    def ctx(rank, size):
        return SharedContext(device=factory.device, dtype=factory.dtype, factory=factory, rank=rank, world_size=size)

    stages = [Stage.POST_EXPORT, Stage.PATTERN_MATCHER, Stage.QUANTIZATION]
    full = export_and_transform(factory, config, ctx=ctx(0, 1), stages=stages)[0]
    shards = [run_transforms(copy.deepcopy(full), build_transforms(config), ctx(rank, world), [Stage.SHARDING])
              for rank in range(world)]
    return full, shards


def _values(gm) -> dict[str, torch.Tensor]:
    """Parameters as comparable values: int4 ``qweight`` as codes, float8 as its bytes."""
    out = {}
    for name, p in gm.named_parameters():
        if name.endswith("qweight"):
            out[name] = unpack_int4(p.detach())
        elif p.dtype == torch.float8_e4m3fn:
            out[name] = p.detach().view(torch.uint8)
        else:
            out[name] = p.detach()
    return out


@pytest.mark.parametrize("flag", FLAGS, ids=str)
def test_quantized_shards_are_slices_of_the_full_linears(flag):
    full, shards = _rank_graphs(tiny_model("llama", **WIDE), FLAGS[flag])
    whole, parts = _values(full), [_values(gm) for gm in shards]
    split = 0
    for name, value in whole.items():
        pieces = [p[name] for p in parts]
        dims = {d for piece in pieces for d in range(value.dim()) if piece.shape[d] != value.shape[d]}
        if not dims:
            assert all(torch.equal(piece, value) for piece in pieces), name
            continue
        assert len(dims) == 1, name
        torch.testing.assert_close(torch.cat(pieces, dims.pop()), value, rtol=0, atol=0, msg=name)
        split += 1
    quantized = [n for n in shards[0].graph.nodes if is_quantized_linear(n)]
    assert len(quantized) == 7 + flag.endswith("lm-head")  # q, k, v, o, gate, up, down (, the LM head)
    assert split >= 7 + 2  # every weight, and some of their scales (an int4 row split keeps all of a channel's)


def test_int4_row_split_inside_a_group_is_refused():
    model = tiny_model("llama", num_hidden_layers=1)  # o_proj: 32 input features a rank, int4 groups of 128
    with pytest.raises(TransformError, match="inside its int4 groups") as info:
        _rank_graphs(model, {"quantize": "int4_weight_only"})
    assert "o_proj" in str(info.value) and info.value.hint


def _tokens(engine, prompts):
    try:
        return [o.outputs[0].token_ids for o in engine.generate(prompts, greedy(8))]
    finally:
        engine.shutdown()


def _tp2_equals_tp1(source, **overrides):
    prompts = random_prompts([3, 17, 29], 256, seed=4)
    tp1 = _tokens(autodeploy.optimize(source, **SMALL, **overrides), prompts)
    assert _tokens(autodeploy.optimize(source, tensor_parallel_size=2, **SMALL, **overrides), prompts) == tp1


def test_int4_flag_quantized_while_loading_tp2_equals_tp1(tmp_path):
    """Each checkpoint weight is quantized by the quantization hook, then the rank keeps its slice."""
    tiny_model("llama", seed=5, **WIDE).save_pretrained(tmp_path)
    _tp2_equals_tp1(str(tmp_path), quantize="int4_weight_only")


def test_gptq_checkpoint_tp2_equals_tp1(tmp_path):
    write_quantized_checkpoint(tiny_model("llama", seed=6, **WIDE), tmp_path, "gptq", group_size=64, sym=False)
    _tp2_equals_tp1(str(tmp_path))


def test_fp8_linears_and_experts_tp2_equals_tp1():
    _tp2_equals_tp1(tiny_model("mixtral", seed=7, num_hidden_layers=1), quantize="fp8")


def test_int8_with_biases_tp2_equals_tp1():
    """Row-split quantized linears with biases (o_proj, down_proj): the bias leaves the op and is added once, after
    the all-reduce."""
    model = tiny_model("llama", seed=8, num_hidden_layers=1, attention_bias=True, mlp_bias=True)
    with torch.no_grad():  # biases start at zero; a bias added on every rank must show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(9))
    _tp2_equals_tp1(model, quantize="int8_weight_only")
