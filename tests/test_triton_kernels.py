"""Triton kernels against their torch references on fresh random inputs (CPU: the Triton interpreter).

Every output is poisoned with NaN before the kernel runs, and every valid element must come back finite and
within the dtype's tolerance. bf16 tolerances allow a couple of ulps: the interpreter truncates fp32 -> bf16
casts where the GPU rounds to nearest (``bench/kernels.py`` checks the GPU on real shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton")

import autodeploy.custom_ops.triton as autodeploy_triton  # noqa: E402
from autodeploy.custom_ops.triton.attention_tiles import AttentionConfig, decode_tile_for  # noqa: E402
from autodeploy.custom_ops.triton.cached_attention import cached_attention_into  # noqa: E402
from autodeploy.custom_ops.triton.glu import glu_packed_launch  # noqa: E402
from autodeploy.custom_ops.triton.rmsnorm import rmsnorm_launch  # noqa: E402
from autodeploy.custom_ops.triton.rope import rope_launch  # noqa: E402

ops = torch.ops.autodeploy
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {  # (atol, rtol)
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
ATTN_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> None:
    assert not torch.isnan(actual).any(), "an output element was never written (NaN poison survived)"
    atol, rtol = tol
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---- paged attention --------------------------------------------------------------------------------------------
@dataclass
class PagedBatch:
    """One step's flattened batch (prefills first) over randomly placed pages holding stale random KV."""

    inputs: dict[str, torch.Tensor]
    num_valid_tokens: int


def _paged_batch(
    seqs: list[tuple[int, int]],  # (cached tokens, new tokens) per sequence
    num_prefill: int,
    n_q: int,
    n_kv: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    v_head_dim: int | None = None,
    pad_tokens: int = 0,
) -> PagedBatch:
    dv = v_head_dim or head_dim
    num_seqs = len(seqs)
    pages_per_seq = max((c + n + page - 1) // page for c, n in seqs) + 1
    num_blocks = num_seqs * pages_per_seq + 3
    page_table = torch.randperm(num_blocks)[: num_seqs * pages_per_seq].view(num_seqs, -1).to(torch.int32)
    lens = [n for _, n in seqs]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    slots = []
    for s, (cached, new) in enumerate(seqs):
        for pos in range(cached, cached + new):
            slots.append(int(page_table[s, pos // page]) * page + pos % page)
    slots += [-1] * pad_tokens
    num_tokens = cu[-1] + pad_tokens
    kw = dict(dtype=dtype, device=DEVICE)
    inputs = dict(
        q=torch.randn(1, num_tokens, n_q, head_dim, **kw),
        k=torch.randn(1, num_tokens, n_kv, head_dim, **kw),
        v=torch.randn(1, num_tokens, n_kv, dv, **kw),
        k_cache=torch.randn(num_blocks, page, n_kv, head_dim, **kw),
        v_cache=torch.randn(num_blocks, page, n_kv, dv, **kw),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        cache_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=DEVICE),
        page_table=page_table.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        batch_info=torch.tensor([num_prefill, cu[num_prefill], num_seqs - num_prefill], dtype=torch.int32),
    )
    return PagedBatch(inputs, cu[-1])


def _check_attention(
    batch: PagedBatch, config: AttentionConfig | None = None, num_splits: int | None = None, **options
) -> None:
    ours_in = {name: t.clone() for name, t in batch.inputs.items()}
    ref_in = {name: t.clone() for name, t in batch.inputs.items()}
    q, v = ours_in["q"], ours_in["v"]
    expected = ops.torch_cached_attention(**ref_in, **options)
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    cached_attention_into(out, **ours_in, **options, config=config, num_splits=num_splits)
    n = batch.num_valid_tokens
    _assert_close(out[:, :n], expected[:, :n], ATTN_TOL[q.dtype])
    assert torch.equal(ours_in["k_cache"], ref_in["k_cache"]) and torch.equal(ours_in["v_cache"], ref_in["v_cache"])


GQA = [(4, 4), (4, 2), (8, 2)]
SMALL_TILES = AttentionConfig(16, 8, 4, 1, 8, 4, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q,n_kv", GQA)
@pytest.mark.parametrize("head_dim,page", [(16, 4), (64, 16)])
def test_attention_prefill(dtype, n_q, n_kv, head_dim, page):
    batch = _paged_batch([(0, 1), (0, 7), (0, 19)], 3, n_q, n_kv, head_dim, page, dtype)
    _check_attention(batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q,n_kv", GQA)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
def test_attention_decode(dtype, n_q, n_kv, num_splits):
    batch = _paged_batch([(0, 1), (6, 1), (40, 1), (150, 1)], 0, n_q, n_kv, 16, 4, dtype)
    _check_attention(batch, config=SMALL_TILES, num_splits=num_splits)


def test_decode_tile_follows_the_programs_the_cache_and_the_heads():
    cpu = torch.device("cpu")  # stands in for 4 multiprocessors
    base = AttentionConfig()
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16

    def tile(programs, dtype, head_dim=128):
        cfg = decode_tile_for(programs, dtype, head_dim, cpu, base)
        assert (cfg.prefill_block_m, cfg.prefill_block_n) == (base.prefill_block_m, base.prefill_block_n)
        return cfg.decode_block_n, cfg.decode_warps, cfg.decode_stages, cfg.decode_maxnreg

    assert tile(1, bf16) == (32, 4, 3, None)  # split over the keys
    assert tile(1, fp8) == (64, 4, 3, 128)
    assert tile(20, fp8) == (64, 4, 3, 128)
    assert tile(12, bf16) == (64, 4, 3, None)
    assert tile(32, fp8) == tile(32, bf16) == (32, 1, 3, None)  # many sequences: one warp a program
    assert tile(100, bf16, head_dim=256) == tile(100, fp8, head_dim=256) == (64, 4, 3, None)  # not swept
    assert tile(1, fp8, head_dim=256) == (32, 4, 3, None)


@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("programs", [1, 16, 10**6])  # split over the keys / a few per SM / one warp a program
def test_attention_decode_with_the_tiles_decode_tile_for_picks(cache, programs):
    cfg = decode_tile_for(programs, cache, 16, DEVICE, SMALL_TILES)
    batch = _paged_batch([(0, 1), (6, 1), (40, 1), (150, 1)], 0, 8, 2, 16, 4, torch.bfloat16)
    for name in ("k_cache", "v_cache"):
        batch.inputs[name] = batch.inputs[name].to(cache)
    _check_attention(batch, config=cfg, kv_scale=0.5 if cache != torch.bfloat16 else 1.0)


def test_attention_prefill_more_sequences_than_one_search_block(monkeypatch):
    """The prefill kernel finds each tile's sequence PREFILL_SEQ_BLOCK sequences at a time (one compiled variant
    for every batch): 11 prefills over three blocks of 4, one of them empty, then decodes."""
    import autodeploy.custom_ops.triton.cached_attention as module

    monkeypatch.setattr(module, "PREFILL_SEQ_BLOCK", 4)
    seqs = [(0, 3), (2, 5), (0, 1), (0, 9), (4, 0), (0, 2), (1, 17), (0, 4), (0, 1), (6, 3), (0, 6), (9, 1), (3, 1)]
    batch = _paged_batch(seqs, 11, 4, 2, 16, 4, torch.float32, pad_tokens=2)
    _check_attention(batch, config=SMALL_TILES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv", GQA)
@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["default", "small_tiles"])
def test_attention_mixed_chunked_prefill(dtype, n_q, n_kv, config):
    """Prefill chunks on top of cached tokens, a fresh prefill, then decodes; padding rows after the batch."""
    seqs = [(5, 7), (0, 19), (13, 11), (12, 1), (33, 1)]
    batch = _paged_batch(seqs, 3, n_q, n_kv, 16, 4, dtype, pad_tokens=3)
    _check_attention(batch, config=config, num_splits=2)


FEATURES = {
    "window": dict(sliding_window=5),
    "window_wide": dict(sliding_window=12),
    "softcap": dict(logit_cap=4.0),
    "sinks": dict(sinks=True),
    "alibi": dict(alibi_slopes=True),
    "all": dict(sliding_window=7, logit_cap=10.0, sinks=True, alibi_slopes=True),
    "scale": dict(scale=0.37),
    "chunk": dict(chunk_size=6),
    "chunk_window": dict(chunk_size=8, sliding_window=5),
}


def _features(name: str, n_q: int) -> dict:
    opts = dict(FEATURES[name])
    if opts.get("sinks"):
        opts["sinks"] = torch.randn(n_q, dtype=torch.float32, device=DEVICE)
    if opts.get("alibi_slopes"):
        opts["alibi_slopes"] = torch.rand(n_q, dtype=torch.float32, device=DEVICE) * 0.5
    return opts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("num_splits", [1, 4])
def test_attention_features(dtype, feature, num_splits):
    n_q, n_kv = 8, 2
    seqs = [(9, 14), (0, 23), (21, 1), (2, 1)]
    batch = _paged_batch(seqs, 2, n_q, n_kv, 16, 4, dtype)
    _check_attention(batch, config=SMALL_TILES, num_splits=num_splits, **_features(feature, n_q))


@pytest.mark.parametrize(
    "config",
    [
        AttentionConfig(16, 8, 4, 1, 8, 4, 1),
        AttentionConfig(64, 16, 4, 1, 32, 4, 1),
        AttentionConfig(128, 32, 4, 1, 16, 4, 1),
    ],
    ids=lambda c: f"m{c.prefill_block_m}n{c.prefill_block_n}",
)
@pytest.mark.parametrize("window", [None, 9])
def test_attention_tiles_long_context(config, window):
    """Several interior (unmasked) key tiles, and pages smaller than a key tile."""
    seqs = [(37, 26), (70, 1), (3, 1)]
    batch = _paged_batch(seqs, 1, 8, 2, 16, 4, torch.float32)
    _check_attention(batch, config=config, num_splits=5, sliding_window=window)


@pytest.mark.parametrize("config", [SMALL_TILES, AttentionConfig(64, 16, 4, 1, 32, 4, 1)], ids=["m16n8", "m64n16"])
@pytest.mark.parametrize("chunk_size", [5, 16, 24])
def test_attention_chunked_local_long_context(config, chunk_size):
    """Chunked local attention over several key tiles: chunk edges inside and on tile edges, decode included."""
    seqs = [(37, 26), (70, 1), (3, 1), (15, 1)]
    batch = _paged_batch(seqs, 1, 8, 2, 16, 4, torch.float32)
    _check_attention(batch, config=config, num_splits=3, chunk_size=chunk_size)


@pytest.mark.parametrize("config", [SMALL_TILES, None], ids=["n8", "default"])
@pytest.mark.parametrize("window", [None, 3, 16])
def test_attention_chunk_offsets(config, window):
    """Prefill chunks starting at every offset within a key tile (the diagonal/interior split must not move)."""
    seqs = [(c, 5 + c % 3) for c in range(17)]
    batch = _paged_batch(seqs, len(seqs), 4, 2, 16, 4, torch.float32)
    _check_attention(batch, config=config, sliding_window=window)


@pytest.mark.parametrize(
    "n_q,n_kv,head_dim,v_head_dim",
    [(12, 2, 16, 16), (14, 2, 16, 16), (4, 2, 24, 24), (4, 1, 24, 16)],
    ids=["group6", "group7", "pad_d", "dv_ne_d"],
)
def test_attention_odd_shapes(n_q, n_kv, head_dim, v_head_dim):
    seqs = [(4, 9), (0, 5), (17, 1)]
    batch = _paged_batch(seqs, 2, n_q, n_kv, head_dim, 4, torch.float32, v_head_dim=v_head_dim)
    _check_attention(batch, config=AttentionConfig(128, 16, 4, 1, 16, 4, 1), num_splits=2)


def test_attention_cuda_graph_padding_sequences():
    """Decode buckets pad with 1-token sequences (cache_len 0, page row 0, slot -1): real rows stay right."""
    batch = _paged_batch([(11, 1), (5, 1), (0, 1), (0, 1)], 0, 4, 2, 16, 4, torch.float32)
    inp = batch.inputs
    inp["slot_mapping"][2:] = -1
    inp["page_table"][2:] = 0
    ours_in = {name: t.clone() for name, t in inp.items()}
    ref_in = {name: t.clone() for name, t in inp.items()}
    expected = ops.torch_cached_attention(**ref_in)
    out = torch.full_like(ours_in["q"], float("nan"))
    cached_attention_into(out, **ours_in, num_splits=2)
    _assert_close(out[:, :2], expected[:, :2], ATTN_TOL[torch.float32])
    assert torch.equal(ours_in["k_cache"], ref_in["k_cache"])


def test_attention_registered_op():
    batch = _paged_batch([(3, 6), (9, 1)], 1, 4, 2, 16, 4, torch.bfloat16)
    ours_in = {name: t.clone() for name, t in batch.inputs.items()}
    ref_in = {name: t.clone() for name, t in batch.inputs.items()}
    out = ops.triton_cached_attention(**ours_in, sliding_window=4)
    expected = ops.torch_cached_attention(**ref_in, sliding_window=4)
    _assert_close(out, expected, ATTN_TOL[torch.bfloat16])
    assert torch.equal(ours_in["v_cache"], ref_in["v_cache"])
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_in = {name: mode.from_tensor(t) for name, t in batch.inputs.items()}
        fake = ops.triton_cached_attention(**fake_in)
    assert fake.shape == out.shape and fake.dtype == out.dtype


# ---- rmsnorm ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 83])
@pytest.mark.parametrize("hidden", [7, 83, 769])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rmsnorm(dtype, tokens, hidden, weight_offset):
    x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE) * 3
    w = torch.randn(hidden, dtype=dtype, device=DEVICE)
    expected = ops.torch_rmsnorm(x, w, 1e-6, weight_offset)
    for max_one_pass in (16384, 64):  # one-pass rows, then the two-pass loop
        out = torch.full_like(x, float("nan"))
        rmsnorm_launch(x, w, 1e-6, weight_offset, out, max_one_pass=max_one_pass)
        _assert_close(out, expected, TOL[dtype])
    _assert_close(ops.triton_rmsnorm(x, w, 1e-6, weight_offset), expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 83])
@pytest.mark.parametrize("hidden", [7, 83, 769])
def test_fused_add_rmsnorm(dtype, tokens, hidden):
    x = torch.randn(2, tokens, hidden, dtype=dtype, device=DEVICE)
    residual = torch.randn(2, tokens, hidden, dtype=dtype, device=DEVICE) * 4
    w = torch.rand(hidden, dtype=dtype, device=DEVICE) + 0.5
    normed_ref, summed_ref = ops.torch_fused_add_rmsnorm(x, residual, w, 1e-5, 0.0)
    torch.testing.assert_close(summed_ref, x + residual)
    for max_one_pass in (16384, 64):
        out, summed = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        rmsnorm_launch(x, w, 1e-5, 0.0, out, residual=residual, summed=summed, max_one_pass=max_one_pass)
        _assert_close(summed, summed_ref, TOL[dtype])
        _assert_close(out, normed_ref, TOL[dtype])
    normed, summed = ops.triton_fused_add_rmsnorm(x, residual, w, 1e-5, 1.0)
    normed_ref, summed_ref = ops.torch_fused_add_rmsnorm(x, residual, w, 1e-5, 1.0)
    _assert_close(normed, normed_ref, TOL[dtype])
    _assert_close(summed, summed_ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_float32_weight_and_output(dtype):
    x = torch.randn(5, 3, 83, dtype=dtype, device=DEVICE)
    w = torch.randn(83, dtype=torch.float32, device=DEVICE)
    for out_dtype in (None, torch.float32):
        out = ops.triton_rmsnorm(x, w, 1e-6, 0.0, out_dtype)
        expected = ops.torch_rmsnorm(x, w, 1e-6, 0.0, out_dtype)
        assert out.dtype == expected.dtype
        _assert_close(out, expected, TOL[dtype])


def test_rmsnorm_strided_rows():
    """Per-head q-norm on a view of a fused projection: rows are strided."""
    qkv = torch.randn(7, 3, 4, 16, device=DEVICE)
    x = qkv[:, 0]  # [7, 4, 16], non-contiguous
    w = torch.randn(16, device=DEVICE)
    _assert_close(ops.triton_rmsnorm(x, w, 1e-6), ops.torch_rmsnorm(x, w, 1e-6), TOL[torch.float32])


# ---- rope -------------------------------------------------------------------------------------------------------
def _cos_sin(bsz: int, seq: int, rot: int, interleaved: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=DEVICE) / rot))
    pos = torch.randint(0, 4096, (bsz, seq), device=DEVICE).float()
    ang = pos[..., None] * inv_freq  # [B, S, R/2]
    ang = ang.repeat_interleave(2, -1) if interleaved else torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,rot", [(16, 16), (64, 64), (64, 32), (80, 40)])
@pytest.mark.parametrize("cos_fp32", [True, False])
def test_rope(dtype, interleaved, head_dim, rot, cos_fp32):
    bsz, seq, heads = 2, 7, 3
    x = torch.randn(bsz, seq, heads, head_dim, dtype=dtype, device=DEVICE)
    cos, sin = _cos_sin(bsz, seq, rot, interleaved, torch.float32 if cos_fp32 else dtype)
    expected = ops.torch_rope(x, cos, sin, interleaved)
    out = torch.full_like(x, float("nan"))
    rope_launch(x, cos, sin, interleaved, out)
    _assert_close(out, expected, TOL[dtype])


def test_rope_strided_input_and_broadcast_cos():
    """q sliced from a fused QKV projection; cos/sin shared across the batch (B = 1)."""
    qkv = torch.randn(3, 83, 6 * 16, device=DEVICE)
    q = qkv[..., : 4 * 16].view(3, 83, 4, 16)
    cos, sin = _cos_sin(1, 83, 16, False, torch.float32)
    expected = ops.torch_rope(q, cos.expand(3, -1, -1), sin.expand(3, -1, -1), False)
    _assert_close(ops.triton_rope(q, cos, sin, False), expected, TOL[torch.float32])


# ---- gated activation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 83])
@pytest.mark.parametrize("inter", [7, 83, 769])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_glu_packed(dtype, tokens, inter, activation):
    gate_up = torch.randn(tokens, 2 * inter, dtype=dtype, device=DEVICE) * 3
    expected = ops.torch_glu_packed(gate_up, activation)
    out = torch.full_like(expected, float("nan"))
    glu_packed_launch(gate_up, activation, out)
    _assert_close(out, expected, TOL[dtype])


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_glu_packed_other_activations(activation):
    gate_up = torch.randn(2, 5, 2 * 83, device=DEVICE)
    expected = ops.torch_glu_packed(gate_up, activation)
    _assert_close(ops.triton_glu_packed(gate_up, activation), expected, TOL[torch.float32])


def test_glu_packed_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        ops.triton_glu_packed(torch.randn(2, 8, device=DEVICE), "swish9")


# ---- registration -----------------------------------------------------------------------------------------------
def test_every_reference_has_a_triton_twin():
    for ref_name, triton_name in autodeploy_triton.TRITON_OPS.items():
        assert hasattr(ops, ref_name) and hasattr(ops, triton_name), (ref_name, triton_name)


@pytest.mark.parametrize(
    "op,args",
    [
        ("triton_rmsnorm", lambda: (torch.randn(3, 83), torch.randn(83), 1e-6, 0.0, None)),
        ("triton_fused_add_rmsnorm", lambda: (torch.randn(3, 83), torch.randn(3, 83), torch.randn(83), 1e-6, 0.0)),
        ("triton_rope", lambda: (torch.randn(1, 5, 2, 16), *_cos_sin(1, 5, 16, False, torch.float32), False)),
        ("triton_glu_packed", lambda: (torch.randn(3, 14), "silu")),
    ],
)
def test_opcheck(op, args):
    inputs = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args())
    torch.library.opcheck(getattr(ops, op).default, inputs, test_utils=("test_schema", "test_faketensor"))


# ---- GPU only ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("num_decode", [1, 64])
def test_attention_decode_cuda_graph_replay(num_decode):
    """Llama-3.1-8B decode shapes, captured once and replayed on new contexts (GPU only)."""
    ctx = 300
    batch = _paged_batch([(ctx + 7 * i, 1) for i in range(num_decode)], 0, 32, 8, 128, 16, torch.bfloat16)
    inp = batch.inputs
    out = torch.empty_like(inp["q"])
    cached_attention_into(out, **inp)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cached_attention_into(out, **inp)
    inp["cache_lens"].sub_(5)  # same buffers, different data: a replay must follow it
    for name in ("q", "k", "v"):
        inp[name].copy_(torch.randn_like(inp[name]))
    ref_in = {name: t.clone() for name, t in inp.items()}
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = ops.torch_cached_attention(**ref_in)
    _assert_close(out, expected, ATTN_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_attention_prefill_many_sequences_llama_shapes():
    """100 prefills (two blocks of the tile search) and 30 decodes with the GPU's default tiles."""
    gen = torch.Generator().manual_seed(3)
    prefills = [(int(c), int(n)) for c, n in zip(torch.randint(0, 50, (100,), generator=gen),
                                                   torch.randint(1, 40, (100,), generator=gen))]
    batch = _paged_batch(prefills + [(200 + 7 * i, 1) for i in range(30)], 100, 32, 8, 128, 16, torch.bfloat16)
    _check_attention(batch)


@pytest.mark.gpu
def test_attention_prefill_llama_shapes():
    batch = _paged_batch([(0, 1024), (256, 300)], 2, 32, 8, 128, 16, torch.bfloat16)
    _check_attention(batch)
    _check_attention(batch, sliding_window=256, logit_cap=30.0)


def _rope_tables(num_tokens: int, rotary: int, dtype: torch.dtype, interleaved: bool):
    pos = torch.randint(0, 500, (num_tokens, 1), device=DEVICE).float()
    freqs = pos / 10000 ** (torch.arange(0, rotary, 2, device=DEVICE).float() / rotary)  # [T, R/2]
    angles = freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1)
    return angles.cos()[None].to(dtype), angles.sin()[None].to(dtype)  # [1, T, R]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved,rotary", [(False, 16), (True, 16), (False, 8)])
@pytest.mark.parametrize("n_q,n_kv", [(4, 2), (8, 2)])
def test_attention_with_rope_in_the_cache_write(dtype, interleaved, rotary, n_q, n_kv):
    """``rope_cos``/``rope_sin``: q and k rotated in the KV write (one launch) == torch_rope, then attention."""
    batch = _paged_batch([(0, 5), (0, 9), (6, 1), (40, 1)], 2, n_q, n_kv, 16, 4, dtype, pad_tokens=3)
    cos, sin = _rope_tables(batch.inputs["q"].shape[1], rotary, dtype, interleaved)
    rope = dict(rope_cos=cos, rope_sin=sin, rope_interleaved=interleaved)
    ours_in = {name: t.clone() for name, t in batch.inputs.items()}
    ref_in = {name: t.clone() for name, t in batch.inputs.items()}
    composed_in = {name: t.clone() for name, t in batch.inputs.items()}
    expected = ops.torch_cached_attention(**ref_in, **rope)
    for name in ("q", "k"):  # the reference's contract: exactly torch_rope first
        composed_in[name] = ops.torch_rope(composed_in[name], cos, sin, interleaved)
    assert torch.equal(ops.torch_cached_attention(**composed_in), expected)
    assert torch.equal(composed_in["k_cache"], ref_in["k_cache"])

    out = torch.full((*batch.inputs["q"].shape[:-1], 16), float("nan"), dtype=dtype, device=DEVICE)
    cached_attention_into(out, **ours_in, **rope)
    n = batch.num_valid_tokens
    _assert_close(out[:, :n], expected[:, :n], ATTN_TOL[dtype])
    _assert_close(ours_in["k_cache"], ref_in["k_cache"], TOL[dtype])
    written = torch.zeros(ours_in["k_cache"].shape[:2], dtype=torch.bool, device=DEVICE).view(-1)
    written[batch.inputs["slot_mapping"][:n]] = True
    untouched = ~written.view(ours_in["k_cache"].shape[:2])
    assert torch.equal(ours_in["k_cache"][untouched], batch.inputs["k_cache"][untouched])  # padding: no write
    assert torch.equal(ours_in["v_cache"], ref_in["v_cache"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_attention_16_bit_activations_over_an_fp8_cache(dtype, num_splits):
    """16-bit q over float8 pools: both products run in float16 (q clamped to its range), prefill and decode."""
    batch = _paged_batch([(0, 6), (5, 3), (9, 1), (40, 1)], 2, 8, 2, 16, 4, dtype)
    for name in ("k_cache", "v_cache"):
        batch.inputs[name] = batch.inputs[name].to(torch.float8_e4m3fn)
    _check_attention(batch, config=SMALL_TILES, num_splits=num_splits, kv_scale=0.5)


@pytest.mark.parametrize("num_splits", [1, 3])  # the decode writes its output / the reduction does (V's scale)
def test_attention_with_rope_into_an_fp8_cache(num_splits):
    """float32 activations (no interpreter bf16 rounding) into float8 pools: the reference's codes."""
    batch = _paged_batch([(0, 6), (3, 1)], 1, 4, 2, 16, 4, torch.float32)
    for name in ("k_cache", "v_cache"):
        batch.inputs[name] = batch.inputs[name].to(torch.float8_e4m3fn)
    cos, sin = _rope_tables(batch.inputs["q"].shape[1], 16, torch.float32, False)
    rope = dict(rope_cos=cos, rope_sin=sin, kv_scale=0.5)
    ours_in = {name: t.clone() for name, t in batch.inputs.items()}
    ref_in = {name: t.clone() for name, t in batch.inputs.items()}
    expected = ops.torch_cached_attention(**ref_in, **rope)
    out = cached_attention_into(torch.empty_like(expected), **ours_in, **rope, num_splits=num_splits)
    _assert_close(out, expected, ATTN_TOL[torch.float32])
    assert torch.equal(ours_in["v_cache"].view(torch.uint8), ref_in["v_cache"].view(torch.uint8))
    ours_k, ref_k = ours_in["k_cache"].float(), ref_in["k_cache"].float()
    # the GPU contracts RoPE's product and sum into one FMA, so a rotated k a rounding away from a code boundary
    # may land one fp8 step (1/8 relative) from torch's; the interpreter rounds like torch, and gives every code
    assert (ours_k != ref_k).float().mean().item() <= (0.01 if DEVICE.type == "cuda" else 0.0)
    torch.testing.assert_close(ours_k, ref_k, atol=2**-9, rtol=0.125)
