"""``autodeploy::triton_moe`` against the ``torch_moe`` reference on fresh random inputs.

On CPU the kernels run in the Triton interpreter, so shapes stay small (tokens up to ~300, experts up to 128
with few tokens); ``@pytest.mark.gpu`` cases take Qwen3-30B-A3B / Mixtral shapes up to 4096 tokens. Outputs
are poisoned with NaN first. Each case checks the relative error against a float64 evaluation of the
reference (the truth) and element-wise closeness to the reference in the same dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton")

import autodeploy.custom_ops.triton  # noqa: E402,F401  (registers the triton ops)
from autodeploy.custom_ops.quant_linear import quantize_fp8_weight  # noqa: E402
from autodeploy.custom_ops.triton.moe import MoeTiles, moe_into  # noqa: E402
from autodeploy.custom_ops.triton.moe_align import align_routing, max_blocks  # noqa: E402

ops = torch.ops.autodeploy
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {  # (relative L2 error vs float64, atol, rtol vs the reference in the same dtype)
    torch.float32: (1e-5, 1e-4, 1e-4),
    torch.bfloat16: (1e-2, 3e-2, 3e-2),
    torch.float16: (3e-3, 5e-3, 5e-3),
}


@dataclass
class MoeCase:
    tokens: int
    experts: int
    top_k: int
    hidden: int
    inter: int
    dtype: torch.dtype = torch.float32
    activation: str = "silu"
    gated: bool = True
    interleaved: bool = False
    bias: bool = False
    limit: float | None = None
    alpha: float | None = None
    fp8: bool = False  # float8 expert weights with per-row scales (appended to the arguments)

    def inputs(self, routing: str = "topk") -> tuple:
        t, e, h, i = self.tokens, self.experts, self.hidden, self.inter
        kw = dict(device=DEVICE)
        u = 2 * i if self.gated else i
        x = torch.randn(t, h, **kw).to(self.dtype)
        w_up = (torch.randn(e, u, h, **kw) / h**0.5).to(self.dtype)
        w_down = (torch.randn(e, h, i, **kw) / i**0.5).to(self.dtype)
        b_up = (0.5 * torch.randn(e, u, **kw)).to(self.dtype) if self.bias else None
        b_down = (0.5 * torch.randn(e, h, **kw)).to(self.dtype) if self.bias else None
        if routing == "topk":  # distinct experts per token, as routers produce
            weights, ids = torch.randn(t, e, **kw).softmax(-1).topk(self.top_k, -1)
        else:  # any ids, repeats within a token included
            ids = torch.randint(0, e, (t, self.top_k), **kw)
            weights = torch.rand(t, self.top_k, **kw)
        args = (x, ids, weights, w_up, w_down, b_up, b_down, self.activation, self.gated, self.interleaved,
                self.limit, self.alpha)
        if not self.fp8:
            return args
        (w_up, up_scale), (w_down, down_scale) = quantize_fp8_weight(w_up), quantize_fp8_weight(w_down)
        return (*args[:3], w_up, w_down, *args[5:], up_scale, down_scale)


def _truth(args: tuple) -> torch.Tensor:
    up = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return ops.torch_moe(*up)


def _check(args: tuple, tiles: MoeTiles | None = None, **launch) -> torch.Tensor:
    x = args[0]
    out = torch.full_like(x, float("nan"))
    scales = dict(zip(("w_up_scale", "w_down_scale"), args[12:]))
    moe_into(out, *args[:12], tiles=tiles, **scales, **launch)
    assert not torch.isnan(out).any(), "an output element was never written (NaN poison survived)"
    rel_tol, atol, rtol = TOL[x.dtype]
    truth = _truth(args)
    rms = truth.pow(2).mean().sqrt().clamp_min(1e-30)
    rel = ((out.double() - truth).norm() / truth.norm().clamp_min(1e-30)).item()
    assert rel < rel_tol, f"relative error {rel:.2e} vs float64 (tolerance {rel_tol:.0e})"
    # absolute errors scale with the output: atol is relative to its RMS
    ref = ops.torch_moe(*args).float()
    torch.testing.assert_close(out.float(), ref, atol=atol * max(1.0, rms.item()), rtol=rtol)
    return out


DTYPES = [torch.float32, torch.bfloat16]


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(
    "tokens,experts,top_k,hidden,inter,dtype",
    [
        (1, 8, 2, 64, 32, F32),
        (1, 8, 2, 64, 32, BF16),
        (7, 8, 1, 83, 37, BF16),
        (83, 16, 4, 83, 37, F32),
        (5, 128, 8, 64, 24, BF16),
        (300, 8, 2, 83, 37, BF16),
    ],
)
def test_moe_matches_reference(tokens, experts, top_k, hidden, inter, dtype):
    _check(MoeCase(tokens, experts, top_k, hidden, inter, dtype).inputs())


def test_moe_many_assignments_two_launch_alignment():
    """130 tokens x top-8 = 1040 assignments: the histogram launch over 1024-assignment chunks runs first."""
    _check(MoeCase(130, 32, 8, 96, 48, BF16).inputs())


ACTIVATION_CASES = [  # every activation once; silu gated is everywhere else
    ("gelu", True, F32),
    ("gelu_tanh", True, BF16),
    ("relu", True, F32),
    ("relu2", True, F32),
    ("silu", False, F32),
    ("gelu", False, BF16),
    ("relu2", False, BF16),
]


@pytest.mark.parametrize("activation,gated,dtype", ACTIVATION_CASES)
def test_moe_activations(activation, gated, dtype):
    _check(MoeCase(19, 8, 2, 40, 24, dtype, activation, gated, bias=gated).inputs())


@pytest.mark.parametrize(
    "dtype,interleaved,limit,alpha",
    [
        (torch.float32, True, 7.0, 1.702),
        (torch.float32, False, None, None),
        (torch.bfloat16, False, 7.0, 1.702),
    ],
)
def test_moe_swiglu_oai(dtype, interleaved, limit, alpha):
    """gpt-oss's clamped gate with biases; inputs scaled so the clamp at 7 bites."""
    case = MoeCase(23, 8, 4, 48, 40, dtype, "swiglu_oai", True, interleaved, True, limit, alpha)
    args = list(case.inputs())
    args[3] = args[3] * 4
    _check(tuple(args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_transposed_weights(dtype):
    """gpt-oss stores ``[E, H, U]`` / ``[E, I, H]`` and the op gets transposed views: read in place."""
    case = MoeCase(29, 8, 2, 48, 40, dtype, "swiglu_oai", True, True, True, 7.0, 1.702)
    x, ids, w, w_up, w_down, *rest = case.inputs()
    w_up_t = w_up.transpose(1, 2).contiguous().transpose(1, 2)
    w_down_t = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w_up_t.is_contiguous()
    _check((x, ids, w, w_up_t, w_down_t, *rest))


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_repeated_ids_and_strided_input(dtype):
    case = MoeCase(31, 8, 4, 64, 40, dtype)
    x, ids, w, *rest = case.inputs(routing="any")
    wide = torch.randn(31, 80, device=DEVICE).to(dtype)
    wide[:, :64] = x
    _check((wide[:, :64], ids, w, *rest))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 40])
def test_moe_sentinel_ids_contribute_nothing(dtype, tokens):
    """Expert-parallel sentinels (-1, E, larger): ignored; a token with only sentinels gets zeros."""
    case = MoeCase(tokens, 8, 4, 64, 32, dtype)
    x, ids, w, *rest = case.inputs()
    drop = torch.rand(ids.shape, device=DEVICE) < 0.3
    drop[0, :2] = True
    sentinels = torch.tensor([-1, 8, 1 << 40], device=DEVICE)[torch.randint(0, 3, ids.shape, device=DEVICE)]
    ids = torch.where(drop, sentinels, ids)
    if tokens > 1:
        ids[-1] = -1
    out = _check((x, ids, w, *rest))
    if tokens > 1:
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("force_align", [False, True], ids=["direct", "aligned"])
@pytest.mark.parametrize("routing", ["topk", "any"])
def test_moe_single_token(force_align, routing):
    """One token takes the direct path (a block per assignment, no alignment launch); repeated ids too."""
    args = MoeCase(1, 16, 6, 83, 37, torch.bfloat16, bias=True).inputs(routing)
    _check(args, force_align=force_align)


@pytest.mark.parametrize(
    "case",
    [
        MoeCase(1, 16, 4, 83, 37, BF16, fp8=True),  # one token: the direct path
        MoeCase(45, 8, 2, 64, 40, BF16, bias=True, fp8=True),
        MoeCase(23, 8, 4, 48, 40, F32, "swiglu_oai", True, True, True, 7.0, 1.702, fp8=True),
    ],
    ids=["one_token", "bf16_bias", "f32_swiglu_oai"],
)
def test_moe_fp8_weights(case):
    """float8 expert weights with per-row scales: the reference's ``(x @ codes^T) * scale``, rounded once."""
    _check(case.inputs())


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_fp8_transposed_weights(dtype):
    """float8 codes stored ``[E, H, U]`` (gpt-oss's layout, as ``quantize_fp8_moe`` keeps it) read in place."""
    x, ids, w, w_up, w_down, *rest = MoeCase(29, 8, 2, 48, 40, dtype, fp8=True).inputs()
    w_up_t, w_down_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (w_up, w_down))
    _check((x, ids, w, w_up_t, w_down_t, *rest))


TILES = [
    MoeTiles(16, 16, 16, 1, 1, 16, 16, 1, 1, 2),  # many N tiles and K steps, odd remainders
    MoeTiles(32, 32, 32, 1, 1, 32, 32, 1, 1, 3),
    MoeTiles(64, 64, 16, 1, 1, 16, 64, 1, 1, 1),
]


@pytest.mark.parametrize(
    "tiles,dtype", [(t, torch.float32) for t in TILES] + [(TILES[1], torch.bfloat16)],
    ids=lambda v: f"m{v.block_m}n{v.up_n}k{v.up_k}" if isinstance(v, MoeTiles) else str(v).split(".")[-1],
)
def test_moe_tiles_and_chunked_alignment(tiles, dtype):
    """Tile shapes with remainders in every dimension, and the alignment split into 64-assignment chunks."""
    _check(MoeCase(45, 8, 3, 83, 37, dtype, bias=True).inputs(), tiles=tiles, chunk=64, one_chunk_max=64)


@pytest.mark.parametrize(
    "tokens,experts,top_k,block_m,chunk",
    [(1, 8, 2, 16, 1024), (50, 12, 3, 16, 32), (200, 64, 8, 32, 256), (37, 128, 6, 64, 1024)],
)
def test_align_routing_layout(tokens, experts, top_k, block_m, chunk):
    """Each valid assignment lands once, in a block of its expert, in order; the block table is right."""
    ids = torch.randn(tokens, experts, device=DEVICE).topk(top_k, -1).indices
    ids[torch.rand(ids.shape, device=DEVICE) < 0.1] = -1
    r = align_routing(ids, experts, block_m, chunk=chunk, one_chunk_max=chunk)
    flat = ids.reshape(-1).cpu()
    sorted_ids, block_expert, block_rows = r.sorted_ids.cpu(), r.block_expert.cpu(), r.block_rows.cpu()
    assert r.num_blocks == max_blocks(flat.numel(), experts, block_m)
    placed = []
    expected_blocks = []
    for e in range(experts):
        mine = torch.nonzero(flat == e).flatten()
        expected_blocks += [e] * -(-mine.numel() // block_m)
        rows = [sorted_ids[b * block_m + i] for b in range(r.num_blocks) if block_expert[b] == e
                for i in range(block_rows[b])]
        assert torch.equal(torch.tensor(rows, dtype=torch.int64), mine), f"expert {e}"  # stable order
        placed += rows
    assert len(placed) == int(((flat >= 0) & (flat < experts)).sum())
    used = block_expert[block_expert >= 0]
    assert used.tolist() == expected_blocks and bool((block_expert[len(used):] == -1).all())
    assert bool((block_rows[: len(used)] > 0).all())


def test_registered_op_and_fake():
    args = MoeCase(9, 8, 2, 64, 32, torch.bfloat16).inputs()
    out = ops.triton_moe(*args)
    torch.testing.assert_close(out.float(), ops.torch_moe(*args).float(), atol=3e-2, rtol=3e-2)
    torch.library.opcheck(ops.triton_moe.default, args, test_utils=("test_schema", "test_faketensor"))


def test_errors():
    args = list(MoeCase(3, 4, 2, 16, 16).inputs())
    with pytest.raises(ValueError, match="unknown activation"):
        ops.triton_moe(*args[:7], "swish9", *args[8:])
    with pytest.raises(ValueError, match="w_up"):
        ops.triton_moe(*args[:4], args[4][:, :, :8], *args[5:])
    fp8 = MoeCase(3, 4, 2, 16, 16, fp8=True).inputs()
    with pytest.raises(ValueError, match="come together"):
        ops.triton_moe(*fp8[:13])
    with pytest.raises(ValueError, match="with scales must be torch.float8"):
        ops.triton_moe(*args, *fp8[12:])
    with pytest.raises(ValueError, match=r"\[E, U\]"):
        ops.triton_moe(*fp8[:12], fp8[12][:, :4], fp8[13])


def test_zero_tokens():
    args = MoeCase(0, 4, 2, 16, 16).inputs()
    assert ops.triton_moe(*args).shape == (0, 16)


# ---- GPU only -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 64, 512, 4096])
@pytest.mark.parametrize(
    "experts,top_k,hidden,inter",
    [(128, 8, 2048, 768), (8, 2, 4096, 1024)],
    ids=["qwen3_30b_a3b", "mixtral_like"],
)
def test_moe_gpu_shapes(tokens, experts, top_k, hidden, inter):
    _check(MoeCase(tokens, experts, top_k, hidden, inter, torch.bfloat16).inputs())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_moe_gpu_fp8_weights(tokens):
    _check(MoeCase(tokens, 128, 8, 2048, 768, torch.bfloat16, fp8=True).inputs())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 33, 300, 2048])  # 2048: over 96 rows an expert, the 128-row tiles
def test_moe_gpu_odd_shapes(tokens):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _check(MoeCase(tokens, 60, 4, 1000, 328, dtype, "swiglu_oai", True, True, True, 7.0, 1.702).inputs())
        _check(MoeCase(tokens, 33, 3, 769, 83, dtype, "gelu_tanh", False, bias=True).inputs())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_moe_gpu_cuda_graph_replay(tokens):
    """Captured once, replayed on new routing and inputs in the same buffers: follows the data exactly."""
    args = MoeCase(tokens, 128, 8, 2048, 768, torch.bfloat16).inputs()
    x, ids, w = args[:3]
    out = ops.triton_moe(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.triton_moe(*args)
    fresh = MoeCase(tokens, 128, 8, 2048, 768, torch.bfloat16).inputs()
    for buf, new in zip((x, ids, w), fresh[:3]):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.triton_moe(*args))  # deterministic: replay == eager, bit for bit
    _check(args)
