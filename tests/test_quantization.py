"""Quantized linears (fp8, int8, int4), their fusion, pre-quantized checkpoints and the fp8 KV cache.

Kernels run on CPU through the Triton interpreter against the torch references; transforms go through the
harness; checkpoints are written here from real weights (``quant_checkpoints.py``) and loaded through the
whole pipeline without dequantization.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import autodeploy
import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy import SamplingParams
from autodeploy.config import build_config
from autodeploy.custom_ops.cached_attention import from_cache, to_cache
from autodeploy.custom_ops.quant_linear import (
    dequantize_int4,
    int4_cat_rows,
    pack_int4,
    quantize_fp8_per_token,
    quantize_fp8_weight,
    quantize_int4_weight,
    quantize_int8_weight,
    unpack_int4,
)
from autodeploy.custom_ops.triton.cached_attention import cached_attention_into
from autodeploy.custom_ops.triton.quant_linear import W_INT4, GemmConfig, fp8_quantize_rows, scaled_mm_linear, wq_gemm
from autodeploy.errors import ConfigError
from autodeploy.models import ModelFactory
from autodeploy.models.tiny import tiny_model
from autodeploy.transforms import Stage
from autodeploy.transforms.gather_logits import find_lm_head
from autodeploy.transforms.graph import find_nodes, is_quantized_linear
from autodeploy.transforms.pipeline import export_and_transform
from quant_checkpoints import write_quantized_checkpoint
from test_triton_kernels import _paged_batch
from transform_harness import check_transforms, count_op, eager_logits, random_inputs

ops = torch.ops.autodeploy
aten = torch.ops.aten
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}
CANONICAL = ["cleanup_noop_ops", "match_attention", "match_rope", "match_rmsnorm", "match_glu"]
BEFORE_CACHE = [s for s in Stage if s.order < Stage.CACHE_INIT.order]
LINEARS_PER_LAYER = 7
FUSED_PER_LAYER = 4  # after fuse_quant_linears: qkv, o, gate/up, down


# ---- helpers -----------------------------------------------------------------------------------------------------
def _fake_quantize(model: torch.nn.Module, fmt: str, lm_head: bool = False, **options) -> torch.nn.Module:
    """The model with every linear (the LM head only if ``lm_head``) replaced by its quantize-dequantize round trip."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (name.endswith("lm_head") and not lm_head):
            continue
        w = module.weight.data
        if fmt == "fp8":
            q, s = quantize_fp8_weight(w)
            module.weight.data = (q.float() * s[:, None]).to(w.dtype)
        elif fmt == "int8":
            q, s = quantize_int8_weight(w)
            module.weight.data = (q.float() * s[:, None]).to(w.dtype)
        else:
            group = options.get("group_size", 128)
            q, s, z = quantize_int4_weight(w, group, options.get("symmetric", False))
            module.weight.data = dequantize_int4(q, s, z, group, w.shape[1]).to(w.dtype)
    return model


def _fp8_activations(model: torch.nn.Module) -> list:
    """Forward pre-hooks quantizing every linear input (LM head excluded) per token, as the fp8 op does."""

    def hook(module, args):
        xq, scale = quantize_fp8_per_token(args[0])
        return ((xq.float() * scale).to(args[0].dtype),)

    return [
        m.register_forward_pre_hook(hook)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]


def _with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    state = ref.state_dict()
    state.update(weights)
    ref.load_state_dict(state)
    return ref


def _checkpoint_graph(folder: Path, **overrides):
    gm, _ = export_and_transform(ModelFactory(folder, device="cpu"), build_config(overrides), stages=BEFORE_CACHE)
    return gm


# ---- ops: Triton (interpreter) vs the torch references -------------------------------------------------------------
SHAPES = [(1, 200, 83), (7, 576, 40), (37, 130, 33)]  # (tokens, in, out): odd sizes, K not a multiple of 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp8_linear_matches_reference(dtype, m, k, n):
    x = torch.randn(m, k, dtype=dtype) * 2
    weight, scale = quantize_fp8_weight(torch.randn(n, k) * 0.05, per_channel=m != 7)
    bias = torch.randn(n, dtype=dtype) if m != 37 else None
    expected = ops.torch_quant_fp8_linear(x, weight, scale, bias)
    torch.testing.assert_close(ops.triton_quant_fp8_linear(x, weight, scale, bias).float(), expected.float(),
                               atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("m", [1, 5, 16, 33])  # below 16 rows the activations are zero-padded, then sliced
def test_scaled_mm_fp8_linear_matches_reference(m):
    """The ``torch._scaled_mm`` path of the fp8 linear (CUDA's at every M; CPU has the same op)."""
    x = torch.randn(m, 96, dtype=torch.bfloat16) * 2
    weight, scale = quantize_fp8_weight(torch.randn(48, 96) * 0.05)
    bias = torch.randn(48, dtype=torch.bfloat16)
    expected = ops.torch_quant_fp8_linear(x, weight, scale, bias)
    out = scaled_mm_linear(x, weight, scale, bias)
    assert out.shape == (m, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_reference(dtype):
    for m, k, n in SHAPES[::2]:
        x = torch.randn(2, m, k, dtype=dtype)  # leading dims are flattened
        weight, scale = quantize_int8_weight(torch.randn(n, k))
        bias = torch.randn(n, dtype=dtype)
        expected = ops.torch_quant_int8_linear(x, weight, scale, bias)
        assert expected.shape == (2, m, n)
        torch.testing.assert_close(ops.triton_quant_int8_linear(x, weight, scale, bias).float(), expected.float(),
                                   atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "group,symmetric,shape",
    [(128, False, SHAPES[0]), (32, True, SHAPES[1]), (64, False, SHAPES[2]), (-1, True, SHAPES[1]),
     (256, False, SHAPES[0]), (64, False, (5, 300, 128))],  # N = 128: rows in 64-row tiles
)
def test_int4_linear_matches_reference(dtype, group, symmetric, shape):
    m, k, n = shape
    x = torch.randn(m, k, dtype=dtype)
    qweight, scales, zeros = quantize_int4_weight(torch.randn(n, k) * 0.05, group, symmetric)
    bias = torch.randn(n, dtype=dtype) if symmetric else None
    expected = ops.torch_quant_int4_linear(x, qweight, scales, zeros, bias, group)
    torch.testing.assert_close(ops.triton_quant_int4_linear(x, qweight, scales, zeros, bias, group).float(),
                               expected.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_int4_split_k_and_tiles(split_k):
    """Split-K partials summed by the last program of each tile equal one pass; several M and N tiles."""
    x = torch.randn(40, 640)
    qweight, scales, zeros = quantize_int4_weight(torch.randn(50, 640), 64, False)
    y = wq_gemm(x, W_INT4, qweight, scales, zeros, None, 64, config=GemmConfig(16, 16, 128, split_k))
    torch.testing.assert_close(y, ops.torch_quant_int4_linear(x, qweight, scales, zeros, None, 64), atol=2e-5, rtol=2e-5)


def test_fp8_activation_quantization_kernel_is_exact():
    x = torch.randn(9, 300) * torch.logspace(-3, 3, 9)[:, None]
    x[3] = 0.0
    xq, scale = fp8_quantize_rows(x)
    ref_q, ref_scale = quantize_fp8_per_token(x)
    assert torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_scale)


def test_int4_row_tiles():
    """N a multiple of 64: each 64-row tile's chunks stored one after another; unpack and concatenation undo it."""
    codes = torch.randint(0, 16, (192, 300), dtype=torch.uint8)
    packed = pack_int4(codes)
    for n, c in [(0, 0), (70, 1), (191, 2)]:
        start = ((n // 64) * 3 + c) * 64 * 16 + (n % 64) * 16
        one_row = pack_int4(codes[n : n + 1, 128 * c : 128 * c + 128])[0]  # 1 row: not tiled
        assert torch.equal(packed.view(-1)[start : start + 16], one_row)
    assert torch.equal(unpack_int4(packed, 300), codes)
    parts = [codes[:64], codes[64:96], codes[96:]]  # tiled, row-major (32 rows), row-major (96 rows)
    assert torch.equal(int4_cat_rows([pack_int4(p) for p in parts]), packed)


def test_int4_packing_and_quantizer():
    codes = torch.randint(0, 16, (5, 300), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 384 // 8) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed, 300), codes)
    w = torch.randn(6, 300)
    for symmetric in (False, True):
        qweight, scales, zeros = quantize_int4_weight(w, 128, symmetric)
        deq = dequantize_int4(qweight, scales, zeros, 128, 300)
        step = scales.float()[torch.arange(300) // 128].t()
        assert (deq - w).abs().le(step * 0.5 + 1e-6).all()  # round to nearest on the stored grid


def test_quantized_ops_opcheck():
    """Schemas and fake kernels. torch's schema check compares inputs with ``allclose``, which has no float8
    kernel on CPU, so the fp8 ops get the fake-tensor check and a bitwise no-mutation check instead."""
    x = torch.randn(3, 64)
    w8, s8 = quantize_fp8_weight(torch.randn(32, 64))
    wi, si = quantize_int8_weight(torch.randn(32, 64))
    q4, s4, z4 = quantize_int4_weight(torch.randn(32, 64), 32)
    for op, args in [
        (ops.torch_quant_int8_linear, (x, wi, si, None)),
        (ops.triton_quant_int8_linear, (x, wi, si, None)),
        (ops.torch_quant_int4_linear, (x, q4, s4, z4, None, 32)),
        (ops.triton_quant_int4_linear, (x, q4, s4, z4, None, 32)),
    ]:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
    for op in (ops.torch_quant_fp8_linear, ops.triton_quant_fp8_linear):
        torch.library.opcheck(op.default, (x, w8, s8, None), test_utils=("test_faketensor",))
        before = [t.clone() for t in (x, w8, s8)]
        op(x, w8, s8, None)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, (x, w8, s8)))


# ---- transforms (real weights: quantized in the transform) ---------------------------------------------------------
@pytest.mark.parametrize(
    "model_type,fmt,flag,op",
    [
        ("llama", "int4", "int4_weight_only", ops.torch_quant_int4_linear.default),
        ("qwen2", "int8", "int8_weight_only", ops.torch_quant_int8_linear.default),  # q/k/v biases
        ("llama", "fp8", "fp8", ops.torch_quant_fp8_linear.default),
    ],
)
def test_quantize_transform(model_type, fmt, flag, op):
    """The weights are pre-rounded to the format's grid, so weight-only formats must match eager exactly.

    ``fuse_quant_linears`` then concatenates q/k/v and gate/up (biases included) and ``fuse_glu`` packs gate/up."""
    model = _fake_quantize(tiny_model(model_type), fmt)
    layers = model.config.num_hidden_layers
    name = f"quantize_{fmt}_linear"
    tol = 3e-2 if fmt == "fp8" else 1e-4  # fp8 also quantizes activations, which eager does not
    _, history = check_transforms(
        model, CANONICAL + [name, "fuse_quant_linears", "fuse_glu"],
        present={op: 4 * layers, aten.linear.default: 1, ops.torch_glu_packed.default: layers},
        overrides={name: {"quantize": flag}}, atol=tol, rtol=tol,
    )
    assert history[name].details["source"] == "flag" and history[name].num_matches == LINEARS_PER_LAYER * layers
    assert history["fuse_quant_linears"].num_matches == 2 * layers


def test_quantize_options():
    model = _fake_quantize(tiny_model("llama"), "int4", lm_head=True, symmetric=True)
    layers = model.config.num_hidden_layers
    overrides = {"quantize_int4_linear": {"quantize": "int4_weight_only", "symmetric": True,
                                          "exclude": ["*.mlp.down_proj"], "quantize_lm_head": True}}
    check_transforms(
        model, CANONICAL + ["quantize_int4_linear"],
        present={ops.torch_quant_int4_linear.default: 6 * layers + 1, aten.linear.default: layers},
        overrides=overrides, atol=1e-4, rtol=1e-4,
    )


@pytest.mark.parametrize("fmt,flag", [("fp8", "fp8"), ("int8", "int8_weight_only"), ("int4", "int4_weight_only")])
def test_triton_backend_in_the_graph(fmt, flag):
    model = tiny_model("llama")
    gm, _ = export_and_transform(
        ModelFactory(model, device="cpu"),
        build_config({"quantize": flag, f"transforms.quantize_{fmt}_linear.backend": "triton"}),
        stages=[Stage.EXPORT, Stage.QUANTIZATION],
    )
    assert count_op(gm, getattr(ops, f"triton_quant_{fmt}_linear").default) == 14
    assert count_op(gm, getattr(ops, f"torch_quant_{fmt}_linear").default) == 0


def test_other_flags_leave_the_graph_alone():
    model = tiny_model("llama")
    overrides = {name: {"quantize": "int8_weight_only"} for name in ["quantize_fp8_linear", "quantize_int4_linear"]}
    _, history = check_transforms(model, ["quantize_fp8_linear", "quantize_int4_linear"], overrides=overrides,
                                  present={aten.linear.default: 15}, reexport=False)
    assert all(info.skipped for info in history.values())


def test_flag_quantization_of_a_checkpoint_folder_quantizes_while_loading(tmp_path):
    """Meta weights get load hooks; the result equals quantizing the same weights in memory."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    ids, pos = random_inputs(2, 9, model.config.vocab_size)
    for flag, op in [("int4_weight_only", ops.torch_quant_int4_linear.default),
                     ("fp8", ops.torch_quant_fp8_linear.default)]:
        from_folder = _checkpoint_graph(tmp_path, quantize=flag)
        in_memory, _ = export_and_transform(ModelFactory(model, device="cpu"), build_config({"quantize": flag}),
                                            stages=BEFORE_CACHE)
        assert count_op(from_folder, op) == FUSED_PER_LAYER * model.config.num_hidden_layers
        torch.testing.assert_close(from_folder(ids, pos), in_memory(ids, pos), atol=1e-6, rtol=1e-6)


# ---- pre-quantized checkpoints ----------------------------------------------------------------------------------
LAYOUTS = [
    ("compressed-tensors", {"strategy": "channel"}, "weight", torch.float8_e4m3fn),
    ("compressed-tensors", {"strategy": "tensor"}, "weight", torch.float8_e4m3fn),
    ("gptq", {"group_size": 32, "sym": True}, "qweight", torch.int32),
    ("gptq", {"group_size": 64, "sym": False}, "qweight", torch.int32),
    ("awq", {"group_size": 32}, "qweight", torch.int32),
]


@pytest.mark.parametrize("layout,options,param,param_dtype", LAYOUTS, ids=lambda v: str(v))
def test_prequantized_checkpoint(tmp_path, layout, options, param, param_dtype):
    model = tiny_model("llama", intermediate_size=192)  # K = 192: a ragged last int4 chunk
    dequantized = write_quantized_checkpoint(model, tmp_path, layout, **options)
    reference = _with_weights(model, dequantized)
    gm = _checkpoint_graph(tmp_path)
    fmt = "fp8" if layout == "compressed-tensors" else "int4"
    op = getattr(ops, f"torch_quant_{fmt}_linear").default
    assert count_op(gm, op) == FUSED_PER_LAYER * model.config.num_hidden_layers
    assert count_op(gm, aten.linear.default) == 1  # the LM head
    stored = gm.get_parameter(f"model.layers.0.mlp.down_proj.{param}")
    assert stored.dtype == param_dtype  # loaded as codes, never dequantized
    hooks = _fp8_activations(reference) if fmt == "fp8" else []
    ids, pos = random_inputs(2, 11, model.config.vocab_size)
    torch.testing.assert_close(gm(ids, pos), eager_logits(reference, ids, pos), atol=1e-4, rtol=1e-4)
    for h in hooks:
        h.remove()


def _assert_greedy_equals_hf(engine, reference: torch.nn.Module) -> None:
    prompts = [[5, 17, 99, 3, 250], [1, 2, 3]]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = reference.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(prompt):]
        assert out.outputs[0].token_ids == expected.tolist()


def test_gptq_checkpoint_engine_greedy_equals_hf(tmp_path):
    model = tiny_model("llama")
    reference = _with_weights(model, write_quantized_checkpoint(model, tmp_path, "gptq", group_size=32, sym=True))
    engine = autodeploy.optimize(tmp_path, device="cpu", max_batch_size=4, max_seq_len=64)
    _assert_greedy_equals_hf(engine, reference)


def test_is_quantized_linear():
    """The predicate ``gather_logits`` (a quantized head) and the sharding (quantized linears split) share."""
    model = tiny_model("llama")
    gm, _ = export_and_transform(ModelFactory(model, device="cpu"), build_config({"quantize": "fp8"}),
                                 stages=[Stage.EXPORT, Stage.QUANTIZATION])
    quantized = [n for n in gm.graph.nodes if is_quantized_linear(n)]
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert all(n.target == ops.torch_quant_fp8_linear.default for n in quantized)
    assert not any(is_quantized_linear(n) for n in find_nodes(gm, aten.linear.default))  # the LM head
    assert find_lm_head(gm).target == aten.linear.default


def test_int4_fusion_of_rows_in_different_tiles():
    """hidden 256 (two chunks a row): q has 64 rows (one tile), k and v 32 each (row-major); the fused qkv has 128
    (two tiles), so fusing re-tiles their rows; the graph still equals HF on the same int4 weights."""
    model = tiny_model("llama", hidden_size=256)
    gm, _ = export_and_transform(ModelFactory(model, device="cpu"), build_config({"quantize": "int4_weight_only"}),
                                 stages=BEFORE_CACHE)
    assert count_op(gm, ops.torch_quant_int4_linear.default) == FUSED_PER_LAYER * model.config.num_hidden_layers
    reference = _fake_quantize(copy.deepcopy(model), "int4")
    ids, pos = random_inputs(2, 9, model.config.vocab_size)
    torch.testing.assert_close(gm(ids, pos), eager_logits(reference, ids, pos), atol=1e-4, rtol=1e-4)


def test_quantized_lm_head_engine_greedy_equals_hf():
    """``quantize_lm_head``: the head is a quantized op that ``gather_logits`` still finds (logits for the sampled
    tokens only), and the engine's greedy tokens equal HF's on the same int4 weights."""
    model = tiny_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    reference = _fake_quantize(copy.deepcopy(model), "int4", lm_head=True)
    engine = autodeploy.optimize(model, device="cpu", quantize="int4_weight_only", max_batch_size=4, max_seq_len=64,
                                 **{"transforms.quantize_int4_linear.quantize_lm_head": True})
    assert engine.runner.gm.graph.find_nodes(op="placeholder", target="logits_indices")
    assert "quant_int4" in str(find_lm_head(engine.runner.gm).target)
    _assert_greedy_equals_hf(engine, reference)


def test_checkpoint_errors(tmp_path):
    model = tiny_model("llama")
    write_quantized_checkpoint(model, tmp_path, "gptq", group_size=32)
    with pytest.raises(ConfigError, match="already quantized"):
        _checkpoint_graph(tmp_path, quantize="fp8")
    config = (tmp_path / "config.json").read_text().replace('"desc_act": false', '"desc_act": true')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ConfigError, match="desc_act"):
        _checkpoint_graph(tmp_path)


# ---- fp8 KV cache -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_scale", [1.0, 0.25])
def test_fp8_kv_cache_attention(dtype, kv_scale):
    """Both backends store the same fp8 codes and equal attention over the dequantized cache."""
    batch = _paged_batch([(5, 3), (0, 9), (12, 1), (7, 1)], 2, 4, 2, 16, 4, dtype)
    fp8_pool = torch.empty(0, dtype=torch.float8_e4m3fn)
    fp8 = {k: (to_cache(v * 4, fp8_pool, kv_scale) if k.endswith("_cache") else v) for k, v in batch.inputs.items()}
    fp8["k"] = fp8["k"] * 300  # some new keys saturate at 448 * kv_scale
    exact = {k: v.clone() for k, v in fp8.items()}  # the fp8 run's numbers, in the activation dtype
    for name in ("k_cache", "v_cache"):
        exact[name] = from_cache(fp8[name], dtype, kv_scale)
    for name in ("k", "v"):
        exact[name] = from_cache(to_cache(fp8[name], fp8_pool, kv_scale), dtype, kv_scale)
    expected = ops.torch_cached_attention(**exact)
    ours_torch = {k: v.clone() for k, v in fp8.items()}
    got_torch = ops.torch_cached_attention(**ours_torch, kv_scale=kv_scale)
    ours_triton = {k: v.clone() for k, v in fp8.items()}
    got_triton = torch.full_like(got_torch, float("nan"))
    cached_attention_into(got_triton, **ours_triton, kv_scale=kv_scale)
    n = batch.num_valid_tokens
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got_torch[:, :n].float(), expected[:, :n].float(), **tol)
    torch.testing.assert_close(got_triton[:, :n].float(), got_torch[:, :n].float(), **tol)
    for name in ("k_cache", "v_cache"):
        assert ours_torch[name].dtype == torch.float8_e4m3fn
        assert torch.equal(ours_torch[name].view(torch.uint8), ours_triton[name].view(torch.uint8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_with_fp8_kv_cache(backend):
    model = tiny_model("llama")
    prompts = [[5, 17, 99, 3, 250, 7, 7, 1], [1, 2, 3]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    base = autodeploy.optimize(model, device="cpu", max_batch_size=4, max_seq_len=64, attn_backend=backend)
    fp8 = autodeploy.optimize(model, device="cpu", max_batch_size=4, max_seq_len=64, attn_backend=backend,
                              **{"kv_cache.dtype": "fp8", "kv_cache.scale": 0.5})
    assert all(pool.dtype == torch.float8_e4m3fn for pool in fp8.runner.kv_caches)
    ref, got = base.generate(prompts, params), fp8.generate(prompts, params)
    for r, g in zip(ref, got):
        assert g.outputs[0].token_ids[:2] == r.outputs[0].token_ids[:2]  # random weights: near-ties may drift later
