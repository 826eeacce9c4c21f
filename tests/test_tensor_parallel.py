"""Tensor parallelism on CPU (gloo, 2 ranks): TP=2 greedy tokens equal TP=1's, each rank keeps its shard of the
weights and of the KV cache, checkpoints stream only each rank's slice, and failures reach rank 0 as typed errors.
"""

from __future__ import annotations

import copy
import multiprocessing

import pytest
import torch
from torch.fx import Node

import autodeploy
from autodeploy.config import build_config
from autodeploy.errors import TransformError, WorkerError
from autodeploy.models import ModelFactory
from autodeploy.models.tiny import tiny_model
from autodeploy.transforms import SharedContext, Stage
from autodeploy.transforms.pipeline import build_transforms, export_and_transform, run_transforms
from autodeploy.transforms.sharding import get_plan
from engine_utils import greedy, hf_greedy, random_prompts

import tp_helpers

SMALL = {"max_batch_size": 8, "max_seq_len": 128, "max_num_tokens": 256, "kv_cache.block_size": 4}
LENGTHS = [3, 17, 29]
MAX_TOKENS = 10
SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
           "experts.gate_up_proj", "experts.down_proj")


def _tokens(engine, prompts, max_tokens=MAX_TOKENS):
    return [o.outputs[0].token_ids for o in engine.generate(prompts, greedy(max_tokens))]


def _hf_tokens(model, prompts, max_tokens=MAX_TOKENS):
    """Hugging Face's greedy tokens, which the TP=1 engine reproduces (test_engine_greedy.py)."""
    return [hf_greedy(model, p, max_tokens) for p in prompts]


def _expected_rank_bytes(model, world: int, replicated_kv: bool = False) -> int:
    """Bytes one rank holds: replicated parameters whole, sharded ones split (KV projections whole if replicated)."""
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        whole = replicated_kv and ("k_proj" in name or "v_proj" in name)
        tied_vocab = name.endswith("embed_tokens.weight") and model.config.tie_word_embeddings
        total += size // world if (any(s in name for s in SHARDED) and not whole) or tied_vocab else size
    return total


def _no_workers_left() -> bool:
    return not [p for p in multiprocessing.active_children() if p.name.startswith("autodeploy-tp-rank")]


@pytest.fixture(scope="module")
def llama_tp(tmp_path_factory):
    """Tiny Llama (4 query heads, 2 KV heads: both split) loaded from a checkpoint folder by 2 ranks."""
    model = tiny_model("llama", seed=3)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    engine = autodeploy.optimize(str(folder), tensor_parallel_size=2, **SMALL)
    yield model, engine
    engine.shutdown()


def test_llama_tp2_greedy_equals_tp1(llama_tp):
    model, engine = llama_tp
    prompts = random_prompts(LENGTHS, model.config.vocab_size)
    tp1 = _tokens(autodeploy.optimize(model, **SMALL), prompts)
    assert _tokens(engine, prompts) == tp1 == _hf_tokens(model, prompts)


def test_each_rank_loads_only_its_shard(llama_tp):
    model, engine = llama_tp
    assert engine.runner.call_on_all_ranks(tp_helpers.rank) == [0, 1]
    hooks = engine.runner.call_on_all_ranks(tp_helpers.weight_hooks)
    assert hooks[0] == hooks[1] > 0  # parameters were sliced as they streamed in from the checkpoint
    assert engine.runner.call_on_all_ranks(tp_helpers.parameter_bytes) == [_expected_rank_bytes(model, 2)] * 2
    assert engine.runner.call_on_all_ranks(tp_helpers.kv_heads) == [[1, 1], [1, 1]]  # 2 KV heads / 2 ranks


def test_every_all_reduce_joins_the_add_and_norm_after_it(llama_tp):
    """After o_proj and after the MLP, in every layer: the residual add and the next RMSNorm (the final one
    after the last layer) run in the all-reduce's op; the greedy test above runs through it."""
    model, engine = llama_tp
    fused = {"all_reduce": 0, "all_reduce_add_rmsnorm": 2 * model.config.num_hidden_layers}
    assert engine.runner.call_on_all_ranks(tp_helpers.collective_ops) == [fused, fused]


def test_failure_in_a_worker_step_reaches_rank0(llama_tp):
    """Last on the shared engine: after it the group is broken."""
    model, engine = llama_tp
    prompt = random_prompts([5], model.config.vocab_size, seed=9)
    engine.runner.call_on_all_ranks(tp_helpers.break_next_step_on_rank1)
    with pytest.raises(WorkerError, match="rank 1 failed: RuntimeError: injected failure") as info:
        engine.generate(prompt, greedy(4))
    assert info.value.rank == 1 and "injected failure" in info.value.remote_traceback
    with pytest.raises(WorkerError):  # broken for good, with the same cause
        engine.generate(prompt, greedy(4))
    engine.shutdown()
    assert _no_workers_left()


def test_qwen3_one_kv_head_replicated_and_tied_vocab():
    model = tiny_model("qwen3", num_hidden_layers=1, num_key_value_heads=1, tie_word_embeddings=True)
    prompts = random_prompts(LENGTHS, model.config.vocab_size, seed=1)
    llm = autodeploy.LLM(model, tensor_parallel_size=2, **SMALL)
    engine = llm.engine
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(MAX_TOKENS))] == _hf_tokens(model, prompts)
        assert engine.runner.call_on_all_ranks(tp_helpers.kv_heads) == [[1], [1]]  # 1 KV head, on both ranks
        per_rank = engine.runner.call_on_all_ranks(tp_helpers.parameter_bytes)
        assert per_rank == [_expected_rank_bytes(model, 2, replicated_kv=True)] * 2
    finally:
        llm.shutdown()
    assert _no_workers_left()


def test_mixtral_expert_parallel():
    model = tiny_model("mixtral", num_hidden_layers=1)  # 4 experts: 2 per rank
    prompts = random_prompts(LENGTHS, model.config.vocab_size, seed=2)
    engine = autodeploy.optimize(model, tensor_parallel_size=2, **SMALL)
    try:
        assert _tokens(engine, prompts) == _hf_tokens(model, prompts)
        per_rank = engine.runner.call_on_all_ranks(tp_helpers.parameter_bytes)
        assert per_rank == [_expected_rank_bytes(model, 2)] * 2
    finally:
        engine.shutdown()


def test_build_failure_on_one_rank_is_a_worker_error():
    model = tiny_model("llama", num_hidden_layers=1)
    overrides = {"transforms.fail_on_rank1": {"stage": "post_export"}}
    with pytest.raises(WorkerError, match="rank 1 failed: TransformError: rank 1 cannot build") as info:
        autodeploy.optimize(model, tensor_parallel_size=2, **SMALL, **overrides)
    assert info.value.rank == 1 and info.value.hint == "it never can"
    assert _no_workers_left()


def _sharded_graph(model, world=2, rank=0, factory=None, stages=None, **overrides):
    config = build_config({**SMALL, "tensor_parallel_size": world, **overrides})
    factory = factory or ModelFactory(model, device="cpu")
    ctx = SharedContext(device=factory.device, dtype=factory.dtype, factory=factory, rank=rank, world_size=world)
    stages = stages or [Stage.POST_EXPORT, Stage.PATTERN_MATCHER, Stage.SHARDING]
    return export_and_transform(factory, config, ctx=ctx, stages=stages)[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 48}, "3 query heads do not divide"),
        ({"num_attention_heads": 12, "num_key_value_heads": 3, "hidden_size": 192}, "3 KV heads cannot be split"),
        ({"vocab_size": 511}, "vocabulary size 511 does not divide"),
    ],
)
def test_unshardable_shapes_name_the_layer(overrides, message):
    model = tiny_model("llama", num_hidden_layers=1, **overrides)
    world = 4 if "KV heads" in message else 2
    with pytest.raises(TransformError, match=message) as info:
        _sharded_graph(model, world=world)
    assert "model." in str(info.value) or "lm_head" in str(info.value)
    assert info.value.hint


def test_sharding_is_off_for_one_rank():
    gm = _sharded_graph(tiny_model("llama", num_hidden_layers=1), world=1, tensor_parallel_size=1)
    assert not [n for n in gm.graph.nodes if "all_reduce" in str(n.target)]


def _moe_operands(gm) -> tuple[dict, int]:
    """The expert weights the (sharded) ``torch_moe`` reads, as tensors, and this rank's expert-id offset."""
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.autodeploy.torch_moe.default)

    def value(arg):
        if not isinstance(arg, Node):
            return arg
        if arg.op == "get_attr":
            return gm.get_parameter(arg.target) if arg.target in dict(gm.named_parameters()) else gm.get_buffer(arg.target)
        if arg.target == torch.ops.aten.transpose.int:
            return value(arg.args[0]).transpose(*arg.args[1:3])
        if arg.target == torch.ops.aten.permute.default:
            return value(arg.args[0]).permute(*arg.args[1])
        raise AssertionError(f"unexpected op {arg.target} on an expert weight")

    names = [a.name for a in node.target._schema.arguments]
    args = {name: node.args[i] if i < len(node.args) else node.kwargs.get(name) for i, name in enumerate(names)}
    operands = {k: value(v) for k, v in args.items() if k not in ("x", "topk_ids", "topk_weights")}
    plan = get_plan(gm)
    return {k: v for k, v in operands.items() if v is not None}, plan.moe[0].id_offset if plan else 0


@pytest.mark.parametrize("quantize", [None, "fp8"])  # float8 experts: their per-row scales split with the rows
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])  # gated concatenated / interleaved with biases
def test_moe_shards_sum_to_the_full_layer(model_type, quantize):
    """In both MoE modes, the ranks' ``torch_moe`` on their own expert weights (and shifted ids) add up to the
    unsharded layer. One export; each rank's sharding stage runs on a copy of the matched graph."""
    model = tiny_model(model_type, num_hidden_layers=1)
    with torch.no_grad():  # biases start at zero; a bias added on every rank must show
        for name, param in model.named_parameters():
            if "bias" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(6))
    only_moe = {"transforms.detect_sharding.attention": False, "transforms.detect_sharding.lm_head": False,
                "transforms.detect_sharding.mlp": False}
    factory = ModelFactory(model, device="cpu")
    unmatched = {f"transforms.{name}.enabled": False for name in ("match_rope", "match_rmsnorm", "match_glu")}
    matched = _sharded_graph(model, world=1, tensor_parallel_size=1, factory=factory, quantize=quantize,
                             stages=[Stage.POST_EXPORT, Stage.PATTERN_MATCHER, Stage.QUANTIZATION], **unmatched)
    full, _ = _moe_operands(matched)
    assert ("w_up_scale" in full) == (quantize == "fp8")
    n_exp, hidden = full["w_up"].shape[0], full["w_down"].shape[1]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, hidden, generator=gen)
    ids = torch.stack([torch.randperm(n_exp, generator=gen)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=gen)
    expected = torch.ops.autodeploy.torch_moe(x, ids, weights, **full)
    for mode in ("expert", "tensor"):
        config = build_config({**SMALL, "tensor_parallel_size": 2, "transforms.detect_sharding.moe": mode,
                               "quantize": quantize, **only_moe})
        shards = []
        for rank in range(2):
            ctx = SharedContext(device=factory.device, dtype=factory.dtype, factory=factory, rank=rank, world_size=2)
            gm = run_transforms(copy.deepcopy(matched), build_transforms(config), ctx, [Stage.SHARDING])
            shards.append(_moe_operands(gm))
        assert get_plan(gm).moe[0].mode == mode
        assert shards[0][0]["w_up"].numel() * 2 == full["w_up"].numel()
        summed = sum(torch.ops.autodeploy.torch_moe(x, ids - offset, weights, **ops) for ops, offset in shards)
        torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-5)
