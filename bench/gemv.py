"""Tile sweep of the decode GEMV (``custom_ops/triton/gemv.py``) and the int4/int8 prefill paths, on one GPU.

    PYTHONPATH=$PWD python3 bench/gemv.py --out $OUT/gemv.json     # ~4 min on an H100
    options: --fmts fp8,int4,dense,int8  --tokens 1,2,4  --workers 14 (parallel Triton compiles)
             --glu (gate_up with the SiLU gating in the GEMV's epilogue, as the engine runs it)
             --shapes llama-tp2 (one rank's linears at tensor parallel 2), qwen3-moe (the MoE model's dense linears)
             --names o,down (only these linears of the set)
             --x-scale-given (fp8: the per-token scale from x's producer)
             --variants cuda,tc (CUDA-core and tensor-core products; int4 on the tensor cores: 50 tiles),
                        wide (CUDA-core tiles of 1-8 rows and 1-4K-long steps), one-row (CUDA-core tiles around
                        the one-row product's defaults: 16-bit 1-4 rows, 8-bit 4-16), tc-narrow (int4 tensor-core
                        tiles over 1-2 warps), default (gemv_config's tiles only), mma (int4: the CUDA C++
                        GEMV, cuda/int4_gemv.py: warps x tiles x ring stages)

For Llama-3.1-8B's four linears per layer (fused qkv, o, fused gate/up, down), each format and M, every tile
config of the grid is timed; the weights rotate over at least ``COPIES`` copies and ``ROTATE_BYTES`` inside one
CUDA graph so L2 (50 MB) holds none of them. One JSON line per result: the best config per shape with its GB/s of
weight read, the baselines (cuBLAS ``F.linear`` on bf16 weights, ``torch._scaled_mm`` for fp8, the tensor-core
Triton GEMM for int4/int8) and, for int4 from 16 tokens up, ``dequantize + cuBLAS`` against the GEMM. The
heuristics in ``gemv_config`` / ``quant_linear.py`` are read off these lines.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graph_timing import capture, replay_us  # noqa: E402  (bench/, the script's folder)
from results import JsonResults  # noqa: E402
from autodeploy.custom_ops.quant_linear import (  # noqa: E402
    quantize_fp8_per_token, quantize_fp8_weight, quantize_int4_weight, quantize_int8_weight,
)

SHAPE_SETS = {  # (N, K) of Llama-3.1-8B's linears, whole and as one rank of two holds them; Qwen3-30B-A3B's dense ones
    "llama": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama-tp2": {"qkv": (3072, 4096), "o": (4096, 2048), "gate_up": (14336, 4096), "down": (4096, 7168)},
    "qwen3-moe": {"qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048), "lm_head": (151936, 2048)},
}
COPIES = 4
ROTATE_BYTES = 200e6
COPY_BPS = 3.0e12
GROUP = 128
PREFILL_TOKENS = [16, 64, 256, 2048]


def tensor_core_grid(fmt: str) -> list[tuple]:
    """(block_n, block_k, split_k, warps, stages, True): the weight tile as the left operand of a tensor-core
    product against the activations padded to 16 rows."""
    if fmt == "int4":  # one 128-long chunk a step (gemv_int4.py)
        return [(bn, 128, sk, w, s, True) for bn, sk, (w, s) in
                itertools.product([64, 128], [1, 2, 4, 8, 16], [(4, 3), (4, 4), (4, 6), (8, 3), (8, 6)])]
    block_ks = [128, 256, 512] if fmt in ("fp8", "int8") else [64, 128, 256]
    return [(bn, bk, sk, w, s, True) for bn, bk, sk, (w, s) in
            itertools.product([32, 64, 128], block_ks, [1, 2, 4, 8], [(4, 3), (4, 4), (8, 3)])]


def grid(fmt: str, m: int, variants: str = "cuda,tc") -> list[tuple]:
    """(block_n, block_k, split_k, warps, stages[, tensor_cores]) candidates: around the bests of the first H100
    sweep for the CUDA-core product (``cuda``), and the tensor-core one (``tc``)."""
    if variants == "default":  # each shape's gemv_config tiles, chosen in main
        return []
    if variants == "mma":  # int4: the CUDA C++ GEMV (cuda/int4_gemv.py): warps, 16-row tiles, ring stages a block
        return [("mma", *c) for c in itertools.product([4, 8, 16], [1, 2, 4], [3, 4])] if fmt == "int4" else []
    if variants == "wide":
        return wide_grid()
    if variants == "one-row" and fmt == "dense":  # around the 16-bit defaults of 1-4 rows
        return [(bn, bk, 1, w, s) for bn, bk, (w, s) in
                itertools.product([1, 2, 4], [512, 1024, 2048], [(4, 1), (4, 2), (8, 1)])]
    if variants == "one-row":  # around the 8-bit default of 8 rows x 1024, 2 stages
        return [(bn, bk, sk, w, s) for bn, bk, sk, (w, s) in
                itertools.product([4, 8, 16], [512, 1024, 2048], [1, 2], [(4, 2), (4, 3), (8, 2)])]
    if variants == "tc-narrow":  # int4 tensor-core tiles of 1-2 warps: programs with no barrier across 4 warps
        return [(bn, 128, sk, w, s, True) for bn, sk, w, s in
                itertools.product([16, 32, 64], [1, 2, 4, 8], [1, 2], [3, 4, 6])]
    tc = tensor_core_grid(fmt) if "tc" in variants else []
    if "cuda" not in variants:
        return tc
    return cuda_core_grid(fmt, m) + tc


def cuda_core_grid(fmt: str, m: int) -> list[tuple]:
    schedules = [(4, 3), (8, 3), (4, 1), (8, 1), (4, 2)]
    if fmt == "int4":
        return [(bn, bk, sk, w, s) for bn, bk, sk, (w, s) in
                itertools.product([4, 8, 16, 32] if m == 1 else [4, 8, 16], [1024, 2048], [1, 2], schedules)]
    if fmt in ("fp8", "int8"):
        return [(bn, bk, sk, w, s) for bn, bk, sk, (w, s) in
                itertools.product([8, 16, 32, 64] if m == 1 else [4, 8, 16], [256, 512, 1024], [1, 2], schedules)]
    return [(bn, bk, sk, w, s) for bn, bk, sk, (w, s) in
            itertools.product([1, 2, 4], [512, 1024, 2048], [1, 2] if m == 1 else [1], schedules)]


def make_weights(fmt: str, n: int, k: int, copies: int) -> list[tuple]:
    out = []
    for _ in range(copies):
        w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
        if fmt == "dense":
            out.append((w,))
        elif fmt == "fp8":
            out.append(quantize_fp8_weight(w))
        elif fmt == "int8":
            out.append(quantize_int8_weight(w))
        else:
            out.append(quantize_int4_weight(w, GROUP))
        del w
    return out


def given_scale(x, fmt: str, x_scale_given: bool):
    """--x-scale-given: x's per-token fp8 scales as its producer (a norm) writes them; else None."""
    return quantize_fp8_per_token(x)[1].view(-1) if x_scale_given and fmt == "fp8" else None


def gemv_call(fmt: str, x, weights: tuple, cfg: tuple | None, glu: bool = False, x_scale=None):
    """The GEMV on ``weights``; ``glu``: as the engine runs a packed ``[gate; up]``, SiLU(gate) * up in its
    epilogue; ``x_scale``: fp8 only, x's per-token scales as its producer (a norm) writes them."""
    from autodeploy.custom_ops.triton.gemv import W_DENSE, W_FP8, W_INT4, W_INT8, GemvConfig, gemv

    if cfg and cfg[0] == "mma":
        from autodeploy.custom_ops.cuda.int4_gemv import MmaGemvConfig, int4_gemv_mma

        return int4_gemv_mma(x, *weights, None, GROUP, glu_activation="silu" if glu else None,
                             config=MmaGemvConfig(*cfg[1:]))
    config = GemvConfig(*cfg) if cfg else None
    code = {"dense": W_DENSE, "fp8": W_FP8, "int8": W_INT8, "int4": W_INT4}[fmt]
    glu_args = dict(glu_activation="silu" if glu else None)
    if x_scale is not None:
        glu_args["x_scale"] = x_scale
    if fmt == "int4":
        return gemv(x, code, weights[0], weights[1], weights[2], None, GROUP, config=config, **glu_args)
    if fmt == "dense":
        return gemv(x, code, weights[0], config=config, **glu_args)
    return gemv(x, code, weights[0], weights[1], config=config, **glu_args)


def wide_grid() -> list[tuple]:
    """CUDA-core tiles of few rows and long steps, as the bf16 GEMV's best (2 rows x 2048): for 8-bit weights
    the same bytes a row a step take 4096-long steps."""
    return [(bn, bk, sk, w, s) for bn, bk, sk, (w, s) in
            itertools.product([1, 2, 4, 8], [1024, 2048, 4096], [1, 2], [(4, 1), (4, 2), (8, 1), (8, 2)])]


def default_tiles(fmt: str, m: int, n: int, k: int) -> list[tuple]:
    """``gemv_config``'s tiles for the shape (``--variants default``)."""
    import dataclasses

    from autodeploy.custom_ops.triton.gemv import W_DENSE, W_FP8, W_INT4, W_INT8, gemv_config

    code = {"dense": W_DENSE, "fp8": W_FP8, "int8": W_INT8, "int4": W_INT4}[fmt]
    return [dataclasses.astuple(gemv_config(m, n, k, code, torch.device("cuda")))]


def compile_worker(work: tuple[list[tuple], dict, bool, bool]) -> int:
    """Compile (into Triton's disk cache) every (fmt, m, cfg) on every shape, as ``main`` times it (``glu`` for
    gate_up, ``x_scale_given`` for fp8); returns the failures."""
    import autodeploy.custom_ops.triton  # noqa: F401

    tasks, shapes, glu, x_scale_given = work
    failures = 0
    weights = {}
    for fmt, m, cfg in tasks:
        for name, (n, k) in shapes.items():
            if (fmt, name) not in weights:
                weights[fmt, name] = make_weights(fmt, n, k, 1)[0]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs = given_scale(x, fmt, x_scale_given)
            try:
                gemv_call(fmt, x, weights[fmt, name], cfg, glu and name == "gate_up", xs)
            except Exception:
                failures += 1
    torch.cuda.synchronize()
    return failures


def graph_us(fn, copies: int) -> float:
    """Median time of one call, from CUDA-graph replays of ``fn`` (which runs ``copies`` calls)."""
    graph, _ = capture(fn)
    us = replay_us(graph) / copies
    del graph
    return us


def nbytes(args: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in args if t is not None)


def rel_err(out, ref) -> float:
    if not torch.isfinite(out).all():
        return math.inf
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def reference(fmt: str, x, args: tuple, glu: bool = False):
    if glu:
        gate, up = reference(fmt, x, args).chunk(2, dim=-1)
        return F.silu(gate) * up
    ops = torch.ops.autodeploy
    if fmt == "dense":
        return x.float() @ args[0].float().t()
    if fmt == "fp8":
        return ops.torch_quant_fp8_linear(x.float(), *args, None)
    if fmt == "int8":
        return ops.torch_quant_int8_linear(x.float(), *args, None)
    return ops.torch_quant_int4_linear(x.float(), *args, None, GROUP)


def baseline(fmt: str, x, args: tuple):
    from autodeploy.custom_ops.triton.quant_linear import W_INT4, W_INT8, scaled_mm_linear, wq_gemm

    if fmt == "dense":
        return F.linear(x, args[0])
    if fmt == "fp8":
        return scaled_mm_linear(x, *args)
    if fmt == "int8":
        return wq_gemm(x, W_INT8, args[0], args[1])
    return wq_gemm(x, W_INT4, *args, None, GROUP)


def dequant_mm(fmt: str, x, args: tuple):
    from autodeploy.custom_ops.triton.dequant_linear import int4_dequant_linear

    return int4_dequant_linear(x, *args, None, GROUP)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--fmts", default="fp8,int4,dense")
    parser.add_argument("--tokens", default="1,2")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--variants", default="cuda,tc", help="cuda (CUDA-core product), tc (tensor cores)")
    parser.add_argument("--shapes", default="llama", choices=sorted(SHAPE_SETS))
    parser.add_argument("--glu", action="store_true", help="gate_up with the SiLU gating epilogue, as in the engine")
    parser.add_argument("--x-scale-given", action="store_true", help="fp8: the per-token scale from x's producer")
    parser.add_argument("--names", default=None, help="only these of the set's linears, e.g. o,down")
    args = parser.parse_args()
    shapes = SHAPE_SETS[args.shapes]
    if args.names:
        shapes = {name: shapes[name] for name in args.names.split(",")}
    import autodeploy.custom_ops.triton  # noqa: F401

    fmts, tokens = args.fmts.split(","), [int(t) for t in args.tokens.split(",")]
    res = JsonResults(args.out, {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "shapes": args.shapes},
                      quiet=("all", "top5"))
    t0 = time.time()
    sweep = {(f, m): grid(f, m, args.variants) for f in fmts for m in tokens}
    tasks = [(f, m, cfg) for (f, m), cfgs in sweep.items() for cfg in cfgs if cfg[0] != "mma"]  # NVRTC: in-process
    chunks = [tasks[i :: args.workers] for i in range(args.workers)]
    failures = 0
    if tasks:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            failures = sum(pool.map(compile_worker, [(chunk, shapes, args.glu, args.x_scale_given)
                                                          for chunk in chunks]))
    res.emit("compile", configs=len(tasks), failures=failures, s=round(time.time() - t0, 1))

    torch.manual_seed(0)
    for fmt in fmts:
        for name, (n, k) in shapes.items():
            glu = args.glu and name == "gate_up"
            size = nbytes(make_weights(fmt, n, k, 1)[0])
            copies = max(COPIES, math.ceil(ROTATE_BYTES / size))
            ws = make_weights(fmt, n, k, copies)
            for m in tokens:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xs = given_scale(x, fmt, args.x_scale_given)

                def run(w, cfg):
                    return gemv_call(fmt, x, w, cfg, glu, xs)

                ref = reference(fmt, x, ws[0], glu)
                row = {"phase": "gemv", "fmt": fmt, "M": m, "shape": name, "glu": glu, "MB": round(size / 1e6, 1)}
                base = graph_us(lambda: [baseline(fmt, x, w) for w in ws], copies)
                row["baseline_us"], row["baseline_GB_s"] = round(base, 2), round(size / base / 1e3)
                results = []
                for cfg in sweep[fmt, m] or default_tiles(fmt, m, n, k):
                    try:
                        us = graph_us(lambda: [run(w, cfg) for w in ws], copies)
                    except Exception as e:  # an illegal config (registers, shared memory) is skipped
                        row.setdefault("errors", []).append(f"{cfg}: {type(e).__name__}")
                        continue
                    results.append((us, cfg))
                results.sort(key=lambda r: r[0])
                if results:
                    best_us, best_cfg = results[0]
                    row.update(best_us=round(best_us, 2), best_GB_s=round(size / best_us / 1e3), best_cfg=best_cfg,
                               roof_us=round(size / COPY_BPS * 1e6, 2),
                               top5=[(round(u, 2), c) for u, c in results[:5]],
                               rel_err=rel_err(run(ws[0], best_cfg), ref),
                               default_us=round(graph_us(lambda: [run(w, None) for w in ws], copies), 2))
                    row["all"] = [(round(u, 2), c) for u, c in results]
                    for kind, best in (("tc", [r for r in results if len(r[1]) > 5 and r[1][5]]),
                                       ("cuda", [r for r in results if len(r[1]) == 5
                                                 or (len(r[1]) > 5 and not r[1][5])]),
                                       ("mma", [r for r in results if r[1][0] == "mma"])):
                        if best:
                            row[f"best_{kind}_us"], row[f"best_{kind}_cfg"] = round(best[0][0], 2), best[0][1]
                            row[f"best_{kind}_rel_err"] = rel_err(run(ws[0], best[0][1]), ref)
                res.add(row)
            if fmt == "int4":
                for m in PREFILL_TOKENS:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    ref = reference(fmt, x, ws[0])
                    row = {"phase": "prefill", "fmt": fmt, "M": m, "shape": name}
                    row["gemm_us"] = round(graph_us(lambda: [baseline(fmt, x, w) for w in ws], copies), 2)
                    row["dequant_mm_us"] = round(graph_us(lambda: [dequant_mm(fmt, x, w) for w in ws], copies), 2)
                    row["dequant_mm_rel_err"] = rel_err(dequant_mm(fmt, x, ws[0]), ref)
                    res.add(row)
            del ws
            torch.cuda.empty_cache()
    res.emit("done", s=round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
