"""Compile this project's newest Triton kernels for an H100 (sm_90) on a machine without a GPU.

    python scripts/compile_sm90.py        # prints one line per kernel variant; exit status 1 if any fails
    python scripts/compile_sm90.py --sass # ... with the SASS of each one's longest loop: instructions, global loads

The Triton interpreter checks what a kernel computes, not whether the GPU compiler accepts it: a construct the
interpreter runs can still fail to lower to PTX. This compiles each variant that ``gemv.py`` (with the add + RMSNorm
prologue too), ``quant_linear.py``, ``dequant_linear.py``, ``moe.py`` and ``moe_router.py`` launch on CUDA (formats,
split-K, the tiles of ``gemv_config``, router sizes, the MoE's one-token and aligned GEMMs), and the small kernels
of a decode step (the tensor-parallel fused all-reduce and the decode attention too) with programmatic dependent
launch on, for ``sm_90`` with Triton's own ``ptxas``, so such a failure shows up on CPU. Must run without
``TRITON_INTERPRET`` (the kernels are then ``JITFunction``s).
"""

from __future__ import annotations

import collections
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.disasm import get_sass  # noqa: E402

from autodeploy.custom_ops.triton.all_reduce_rmsnorm import _all_reduce_rmsnorm_kernel  # noqa: E402
from autodeploy.custom_ops.triton.cached_attention import _decode_kernel  # noqa: E402
from autodeploy.custom_ops.triton.dequant_linear import _int4_dequant_kernel  # noqa: E402
from autodeploy.custom_ops.triton.gemv import W_DENSE, W_FP8, W_INT4, W_INT8, _gemv_kernel  # noqa: E402
from autodeploy.custom_ops.triton.glu import _glu_fp8_rows_kernel, _glu_kernel  # noqa: E402
from autodeploy.custom_ops.triton.kv_write import _kv_write_kernel, _rope_kv_write_kernel  # noqa: E402
from autodeploy.custom_ops.triton.moe import _moe_down_kernel, _moe_up_kernel, default_tiles  # noqa: E402
from autodeploy.custom_ops.triton.moe_router import _moe_router_kernel, router_launch  # noqa: E402
from autodeploy.custom_ops.triton.quant_linear import _wq_gemm_kernel  # noqa: E402
from autodeploy.custom_ops.triton.rmsnorm import _rmsnorm_rows_kernel  # noqa: E402
from autodeploy.custom_ops.triton.rope import _rope_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUDA = torch.device("cuda")  # for the tile choosers (no device is touched)
LINEAR_ARGS = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "part_ptr", "lock_ptr",
               "M", "N", "K", "stride_xm", "stride_ym", "stride_wn", "stride_sg"]
WEIGHT = {W_DENSE: "*bf16", W_FP8: "*fp8e4nv", W_INT8: "*i8", W_INT4: "*i32"}


def linear_signature(fmt: int, last_int: str, consts: dict) -> dict:
    scale = "*fp16" if fmt == W_INT4 else "*fp32"
    types = ["*bf16", WEIGHT[fmt], scale, scale, "*bf16", "*bf16", "*fp32", "*i32"] + ["i32"] * 7
    return {**dict(zip(LINEAR_ARGS, types)), last_int: "i32", **{k: "constexpr" for k in consts}}


def gemv_signature(fmt: int, consts: dict) -> dict:
    """``_gemv_kernel``'s: the linear's arguments with the add + RMSNorm prologue's after the split counters."""
    base = linear_signature(fmt, "steps_per_split", consts)
    names = list(base)
    norm = {"r_ptr": "*bf16", "nw_ptr": "*bf16", "normed_ptr": "*bf16", "summed_ptr": "*bf16", "eps": "fp32",
            "w_offset": "fp32", "xs_ptr": "*fp32"}
    return {**{k: base[k] for k in names[:8]}, **norm, **{k: base[k] for k in names[8:]}}


def moe_variants():
    """The fused MoE's grouped GEMMs: one token (direct) and aligned blocks, 16-bit and float8 experts."""
    up = ["x_ptr", "w_ptr", "ws_ptr", "b_ptr", "h_ptr", "sorted_ptr", "blk_expert_ptr", "blk_rows_ptr", "H", "U", "I",
          "E", "top_k", "num_blocks", "stride_xt", "stride_we", "stride_wn", "stride_wk", "stride_wse", "stride_be",
          "stride_hm"]
    down = ["h_ptr", "w_ptr", "ws_ptr", "b_ptr", "y_ptr", "sorted_ptr", "blk_expert_ptr", "blk_rows_ptr", "topw_ptr",
            "N", "K", "E", "num_blocks", "stride_hm", "stride_we", "stride_wn", "stride_wk", "stride_wse", "stride_be",
            "stride_ym"]
    for direct, assignments in ((True, 8), (False, 512), (False, 32768)):  # one token, decode, prefill blocks
        for fp8 in (False, True):
            weight, scales = ("*fp8e4nv", "*fp32") if fp8 else ("*bf16", "*bf16")
            up_types = ["*bf16", weight, scales, "*bf16", "*bf16", "*i64", "*i32", "*i32"] + ["i32"] * 13
            down_types = ["*bf16", weight, scales, "*bf16", "*bf16", "*i64", "*i32", "*i32", "*bf16"] + ["i32"] * 11
            tiles = default_tiles(assignments, 128, torch.bfloat16, CUDA, direct, fp8)
            common = dict(BLOCK_M=tiles.block_m, GROUP_M=tiles.group_m, HAS_BIAS=False, W_SCALED=fp8, EVEN_K=True,
                          UPCAST=False, IEEE=False, RNE=False, DIRECT=direct, USE_PDL=True)
            consts = dict(common, BLOCK_N=tiles.up_n, BLOCK_K=tiles.up_k, COLS=tiles.up_n // 2, GATED=True,
                          INTERLEAVED=False, ACT=0, CLAMP=False)
            signature = {**dict(zip(up, up_types)), "limit": "fp32", "alpha": "fp32",
                         **{k: "constexpr" for k in consts}}
            launch = dict(num_warps=tiles.up_warps, num_stages=tiles.up_stages)
            name = f"direct={direct} fp8={fp8} block_m={tiles.block_m}"
            yield f"moe_up {name} {tiles.up_n}x{tiles.up_k}", _moe_up_kernel, signature, consts, launch
            consts = dict(common, BLOCK_N=tiles.down_n, BLOCK_K=tiles.down_k)
            signature = {**dict(zip(down, down_types)), **{k: "constexpr" for k in consts}}
            launch = dict(num_warps=tiles.down_warps, num_stages=tiles.down_stages)
            yield f"moe_down {name} {tiles.down_n}x{tiles.down_k}", _moe_down_kernel, signature, consts, launch


def variants():
    """(name, kernel, signature, constexprs, options) of every variant checked."""
    yield from moe_variants()
    for fmt, bm, bn, bk, split, warps, stages, glu, norm in [
        (W_DENSE, 1, 4, 512, 1, 4, 2, -1, True), (W_DENSE, 1, 2, 1024, 1, 4, 2, 0, True),
        (W_DENSE, 16, 32, 256, 4, 4, 4, -1, True),
    ] + [(*v, False) for v in [
        (W_DENSE, 1, 2, 2048, 1, 4, 1, -1), (W_DENSE, 1, 1, 1024, 1, 4, 2, -1), (W_DENSE, 2, 4, 512, 1, 4, 3, -1),
        (W_FP8, 1, 8, 1024, 1, 4, 2, -1), (W_FP8, 2, 16, 512, 1, 4, 2, -1), (W_INT8, 1, 16, 512, 1, 4, 3, -1),
        (W_INT4, 1, 8, 1024, 2, 4, 3, -1), (W_INT4, 2, 8, 1024, 1, 4, 3, -1),
        (W_DENSE, 1, 2, 1024, 1, 4, 2, 0), (W_FP8, 1, 8, 1024, 1, 4, 2, 0), (W_INT4, 1, 8, 1024, 1, 4, 3, 0),
        (W_FP8, 1, 8, 512, 1, 4, 2, -1), (W_FP8, 16, 128, 512, 1, 8, 3, 0), (W_DENSE, 16, 64, 128, 1, 4, 3, -1),
        (W_DENSE, 16, 32, 256, 4, 4, 4, 0), (W_INT8, 16, 64, 256, 1, 4, 3, -1),
        (W_INT4, 16, 64, 128, 1, 4, 4, 0), (W_INT4, 16, 64, 128, 4, 4, 4, -1), (W_INT4, 16, 128, 128, 2, 8, 3, -1),
    ]]:
        tensor_cores = bm == 16  # the tensor-core product pads the activations to 16 rows
        consts = dict(W_FMT=fmt, GROUP=128 if fmt == W_INT4 else 1, HAS_ZEROS=fmt == W_INT4, HAS_BIAS=True,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, HW_FP8=True, GLU_ACT=glu, RNE=False,
                      TENSOR_CORES=tensor_cores, NORM=norm, NORM_H=2048 if norm else 1, NORM_OFFSET=False,
                      NORM_PROD=tl.bfloat16, X_COLS=1 if bm == 16 else bm, OFFSET_CHUNKS=16 if split == 1 else 4,
                      ROW_TILE=64 if fmt == W_INT4 and glu < 0 else 1, USE_PDL=True,
                      XS_GIVEN=fmt == W_FP8 and bm in (1, 16) and bk == 512)  # q/k/v, gate/up at 1 token
        name = f"gemv fmt={fmt} M<={bm} {bn}x{bk} split={split} warps={warps} glu={glu} tc={tensor_cores} norm={norm}"
        yield (name, _gemv_kernel, gemv_signature(fmt, consts), consts, dict(num_warps=warps, num_stages=stages))
    for fmt, act_fp8, bm, bn, bk, split, warps, stages in [
        (W_INT4, False, 16, 64, 128, 4, 4, 4), (W_INT8, False, 16, 64, 256, 4, 4, 3),
        (W_FP8, True, 64, 64, 128, 1, 4, 4),
    ]:
        consts = dict(W_FMT=fmt, ACT_FP8=act_fp8, GROUP=128 if fmt == W_INT4 else 1, PLANES=8 if fmt == W_INT4 else 1,
                      HAS_ZEROS=fmt == W_INT4, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                      DOT=tl.bfloat16, IEEE=False, ROW_TILE=64 if fmt == W_INT4 else 1)
        yield (f"wq_gemm fmt={fmt} {bm}x{bn}x{bk} split={split}", _wq_gemm_kernel,
               linear_signature(fmt, "chunks_per_split", consts), consts, dict(num_warps=warps, num_stages=stages))
    consts = dict(GROUP=128, HAS_ZEROS=True, BLOCK_N=16, CHUNKS=2, ROW_TILE=64)
    signature = {"q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "w_ptr": "*bf16", "N": "i32", "K": "i32",
                 "stride_qn": "i32", "stride_sg": "i32", "stride_wn": "i32", **{k: "constexpr" for k in consts}}
    yield "int4_dequant 16x2", _int4_dequant_kernel, signature, consts, dict(num_warps=4)
    for experts, top_k, rows, weights in [(128, 8, 16, "*fp32"), (128, 8, 1, "*bf16"), (8, 2, 16, "*fp32"),
                                          (256, 8, 8, "*bf16")]:
        consts = dict(TOP_K=top_k, NORMALIZE=True, ROWS=rows, BLOCK_E=experts, BLOCK_K=top_k, RNE=False,
                      USE_PDL=True)
        signature = {"logits_ptr": "*bf16", "w_ptr": weights, "ids_ptr": "*i64", "T": "i32", "E": "i32",
                     "stride_t": "i32", **{k: "constexpr" for k in consts}}
        launch = dict(num_warps=router_launch(rows, experts)[1])
        yield f"moe_router E={experts} k={top_k} rows={rows}", _moe_router_kernel, signature, consts, launch
    yield from decode_chain_variants()


def decode_chain_variants():
    """The small kernels between a decode step's GEMVs, with programmatic dependent launch on."""
    for fp8, scale in ((False, False), (True, False), (False, True)):  # the codes of the output / its scales
        consts = dict(BLOCK_R=1, BLOCK_H=4096, HAS_RESIDUAL=True, HAS_OFFSET=False, X_DTYPE=tl.bfloat16,
                      PROD_DTYPE=tl.bfloat16, FP8_OUT=fp8, SCALE_OUT=scale, RNE=False, USE_PDL=True)
        signature = {**dict.fromkeys(["x_ptr", "r_ptr", "w_ptr", "o_ptr", "sum_ptr"], "*bf16"),
                     "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                     **dict.fromkeys(["n_rows", "H", "stride_x", "stride_r", "stride_o", "stride_sum", "stride_q"],
                                     "i32"),
                     "eps": "fp32", "w_offset": "fp32", **{k: "constexpr" for k in consts}}
        yield (f"rmsnorm rows, residual, fp8={fp8} scale={scale}", _rmsnorm_rows_kernel, signature, consts,
               dict(num_warps=8))
    for dtype, tl_type, world in (("bf16", tl.bfloat16, 2), ("fp32", tl.float32, 8)):
        consts = dict(RANK=1, WORLD=world, BLOCK_H=4096, HAS_OFFSET=False, X_DTYPE=tl_type, PROD_DTYPE=tl_type,
                      USE_PDL=True, RNE=False)
        signature = {**dict.fromkeys(["x_ptr", "r_ptr", "w_ptr", "o_ptr", "sum_ptr"], f"*{dtype}"),
                     **dict.fromkeys(["data_ptrs", "flag_ptrs", "state_ptr"], "*i64"),
                     **dict.fromkeys(["n_rows", "H", "slot_elems"], "i32"), "eps": "fp32", "w_offset": "fp32",
                     **{k: "constexpr" for k in consts}}
        yield (f"all_reduce_rmsnorm {dtype} world={world}", _all_reduce_rmsnorm_kernel, signature, consts,
               dict(num_warps=8))
    consts = dict(BLOCK=2048, ACT=0, RNE=False, USE_PDL=True)
    signature = {"gu_ptr": "*bf16", "o_ptr": "*bf16", "inter": "i32", "stride_gu": "i32", "stride_o": "i32",
                 **{k: "constexpr" for k in consts}}
    yield "glu silu", _glu_kernel, signature, consts, dict(num_warps=8)
    consts = dict(BLOCK=2048, ACT=0, OUT_DTYPE=tl.bfloat16, RNE=False, USE_PDL=True)
    signature = {"gu_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "inter": "i32", "stride_gu": "i32",
                 "stride_q": "i32", **{k: "constexpr" for k in consts}}
    yield "glu silu, fp8 codes", _glu_fp8_rows_kernel, signature, consts, dict(num_warps=8)
    consts = dict(R=128, PASS=0, BLOCK_HALF=64, BLOCK_PASS=1, BLOCK_N=16, INTERLEAVED=False, COMPUTE=tl.float32,
                  RNE=False, USE_PDL=True)
    ints = ["S", "N", "sxb", "sxs", "sxn", "scb", "scs", "ssb", "sss", "sob", "sos", "son"]
    signature = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "o_ptr": "*bf16",
                 **dict.fromkeys(ints, "i32"), **{k: "constexpr" for k in consts}}
    yield "rope neox", _rope_kernel, signature, consts, dict(num_warps=4)
    consts = dict(D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, BLOCK_H=8, PAGE=16, CACHE_FP8=False, USE_PDL=True)
    ints = ["stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_kcb", "stride_kcs", "stride_kch",
            "stride_vcb", "stride_vcs", "stride_vch", "n_kv"]
    signature = {**dict.fromkeys(["k_ptr", "v_ptr", "kc_ptr", "vc_ptr"], "*bf16"), "slot_ptr": "*i64",
                 **dict.fromkeys(ints, "i32"), "inv_scale": "fp32", **{k: "constexpr" for k in consts}}
    yield "kv_write bf16", _kv_write_kernel, signature, consts, dict(num_warps=4)
    for cache, fp8, norms in (("*bf16", False, False), ("*fp8e4nv", True, False), ("*bf16", False, True)):
        consts = dict(R=128, PASS=0, BLOCK_HALF=64, BLOCK_PASS=1, DV=128, BLOCK_DV=128, BLOCK_H=16, PAGE=16,
                      INTERLEAVED=False, COMPUTE=tl.bfloat16, CACHE_FP8=fp8, Q_NORM=norms, K_NORM=norms,
                      HAS_OFFSET=False, RNE=False, USE_PDL=True)
        ints = ["stride_qt", "stride_qh", "stride_qot", "stride_qoh", "stride_kt", "stride_kh", "stride_vt",
                "stride_vh", "stride_kcb", "stride_kcs", "stride_kch", "stride_vcb", "stride_vcs", "stride_vch",
                "stride_ct", "stride_st", "n_q", "n_kv"]
        signature = {**dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "qo_ptr"], "*bf16"), "kc_ptr": cache,
                     "vc_ptr": cache, "slot_ptr": "*i64", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
                     "qn_ptr": "*bf16", "kn_ptr": "*bf16", **dict.fromkeys(ints, "i32"), "inv_scale": "fp32",
                     "eps": "fp32", "w_offset": "fp32", **{k: "constexpr" for k in consts}}
        yield f"rope_kv_write cache={cache} norms={norms}", _rope_kv_write_kernel, signature, consts, dict(num_warps=4)
    four_warps = dict(num_warps=4, num_stages=3)
    tiles = ((True, 32, "*bf16", four_warps), (False, 64, "*bf16", four_warps),
             (False, 32, "*fp8e4nv", dict(num_warps=1, num_stages=3)),  # decode_tile_for's tiles
             (False, 64, "*fp8e4nv", dict(four_warps, maxnreg=128)))
    for split, block_n, cache, launch in tiles:  # split: partials for the reduction launch
        consts = dict(G=4, HEADS=4, NUM_HG=1, D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, BLOCK_H=16, BLOCK_N=block_n,
                      PAGE=16, HAS_WINDOW=False, HAS_CHUNK=False, HAS_CAP=False, HAS_ALIBI=False, HAS_SINKS=split,
                      SPLIT=split, UPCAST=False, IEEE=False, USE_PDL=True)
        ints = ["first_seq", "num_splits", "n_q", "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb",
                "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_pt"]
        signature = {**dict.fromkeys(["q_ptr", "o_ptr"], "*bf16"), **dict.fromkeys(["kc_ptr", "vc_ptr"], cache),
                     **dict.fromkeys(["part_acc_ptr", "part_ml_ptr"], "*fp32"),
                     **dict.fromkeys(["seq_lens_ptr", "cu_ptr", "cache_lens_ptr", "pt_ptr"], "*i32"),
                     **dict.fromkeys(["sinks_ptr", "alibi_ptr"], "*bf16"), **dict.fromkeys(ints, "i32"),
                     **dict.fromkeys(["qk_scale", "cap_scale", "cap_inv"], "fp32"), "window": "i32", "chunk": "i32",
                     "v_scale": "fp32",
                     **{k: "constexpr" for k in consts}}
        yield f"decode attention split={split} cache={cache} {launch}", _decode_kernel, signature, consts, launch


#: integer arguments a real launch specializes as multiples of 16 (Triton's divisibility hint), which decides
#: whether loads vectorize: the sizes and strides of the Llama and Qwen3-30B-A3B shapes all are, as every pointer
ALIGNED = {"N", "K", "stride_xm", "stride_ym", "stride_wn", "stride_sg", "H", "U", "I", "stride_xt", "stride_we",
           "stride_hm", "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh",
           "stride_vb", "stride_vs", "stride_vh", "stride_pt", "stride_kt", "stride_vt", "stride_qot", "stride_qoh",
           "stride_kcb", "stride_kcs", "stride_kch", "stride_vcb", "stride_vcs", "stride_vch", "stride_gu",
           "stride_o", "stride_q", "inter"}
#: arguments a real launch passes as 1, which Triton specializes into constants (the experts' unit K stride)
UNIT = {"stride_wk"}


def longest_loop(sass: str) -> str:
    """The instruction count of the longest loop (a label to the backward branch to it) and its global loads by
    width: what a kernel's main loop costs per step, read on CPU (``LDG.E.128`` is 16 bytes a thread)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\w+):$", line.strip()))}
    body: list[str] = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA (\w+);", line)
        start = labels.get(target.group(1), i) if target else i
        if start < i and i - start > len(body):
            body = lines[start + 1 : i + 1]
    ops = [m.group(1) for line in body if (m := re.search(r"\t(?:@!?U?P\w+ )?([A-Z][A-Z0-9_.]*)", line))]
    loads = collections.Counter(op for op in ops if op.startswith(("LDG.", "LDGSTS.")))
    return f"loop of {len(ops)} instructions, global loads {dict(loads) or 'none'}"


def main() -> int:
    sass = "--sass" in sys.argv[1:]
    failed = 0
    for name, kernel, signature, consts, options in variants():
        unit = {a: 1 for a in UNIT if a in signature}
        signature, consts = {**signature, **dict.fromkeys(unit, "constexpr")}, {**consts, **unit}
        names = list(signature)
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
                 if a in ALIGNED or signature[a].startswith("*")}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs),
                                      target=TARGET, options=options)
            print(f"ok      {name}: {len(compiled.asm['ptx'])} chars of PTX")
            if sass:
                print(f"        {longest_loop(get_sass(compiled.asm['cubin']))}")
        except Exception as e:  # every variant is tried, each failure printed
            failed += 1
            print(f"FAILED  {name}: {type(e).__name__}: {str(e)[:600]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
