"""Fused MoE on one H100 with Qwen3-30B-A3B's shapes (bf16, random weights): the layer, then the whole model.

    PYTHONPATH=$PWD python3 bench/moe.py --out $OUT/moe.json   # ~4 min: kernels, then the 48-layer engine
    python bench/moe.py --smoke --out /tmp/moe.json              # CPU, Triton interpreter, tiny shapes
    options: --skip-kernels, --skip-e2e, --layers N (engine depth), --sweep (a few decode tile candidates),
             --prefill-sweep (block tiles at --tokens, default 256,1024,4096,8192), --profile (each kernel's time),
             --registers (registers and spills of each compiled GEMM),
             --tokens 1,64 (the kernel phase's token counts), --fp8 (float8 experts: the kernels' weights, and
             ``quantize: fp8`` for the engine)

One JSON line is printed per measurement (``{"phase": ..., ...}``); ``--out`` gets all of them and the device.

**Kernels** (hidden 2048, 128 experts, top-8, moe_intermediate 768; T = 1, 64, 512, 4096 tokens routed by a
Qwen3-style router on random logits). ``triton_moe`` is checked against a float32 evaluation of ``torch_moe``
(``rel_err``, must stay under 1e-2), then timed: ``graph_us`` = CUDA-graph replay of ``ROTATE`` layers with
their own weights and routing (1.2 GB of experts each, so L2 holds nothing over) / ``ROTATE``, what a captured
decode step sees; ``torch_us`` = the ``torch_moe`` reference (do_bench median, eager: it syncs per expert).
``roof_us = max(bytes / 3.0 TB/s, FLOPs / 795 TFLOP/s)`` with bytes = the touched experts' weights + x + out.

**Engine** (``moe_e2e.py``): batch-1 decode vs its roofline, 1000 x 128/128 offline, and the same engine
with every MoE swapped back to ``torch_moe``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

import autodeploy.custom_ops  # noqa: E402,F401  (torch references)
import autodeploy.custom_ops.triton  # noqa: E402,F401  (Triton ops)
from autodeploy.custom_ops.quant_linear import quantize_fp8_weight  # noqa: E402
from autodeploy.custom_ops.triton.moe import MoeTiles, default_tiles, moe_into  # noqa: E402
from results import JsonResults  # noqa: E402  (bench/, the script's folder)

ops = torch.ops.autodeploy
DEV = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float32 if SMOKE else torch.bfloat16
H, E, K, I = (64, 16, 4, 32) if SMOKE else (2048, 128, 8, 768)
TOKENS = [1, 40] if SMOKE else [1, 64, 512, 4096]
ROTATE = 2 if SMOKE else 4
COPY_BPS, MMA_FLOPS = 3.0e12, 795e12  # H100 copy bandwidth (measured) and dense bf16 rate
REL_TOL = 1e-2
FP8 = "--fp8" in sys.argv
PROFILE = "--profile" in sys.argv and not SMOKE
DECODE_SWEEP = [  # --sweep / --decode-tiles: decode (T = 1) candidates beside the default
    MoeTiles(16, 64, 128, 4, 4, 64, 128, 4, 4),  # the default before run 33
    MoeTiles(16, 128, 128, 4, 4, 128, 128, 4, 4),
    MoeTiles(16, 64, 128, 4, 4, 32, 256, 4, 3),
] + [  # run 35: longer GEMM-1 steps (more contiguous bytes a weight row a step), then other GEMM-2 tiles
    MoeTiles(16, *up, 64, 256, 4, 3) for up in [(64, 256, 4, 4), (64, 512, 4, 3), (128, 256, 8, 3), (32, 512, 4, 4),
                                                (64, 256, 8, 4), (128, 256, 8, 4), (32, 1024, 4, 3)]
] + [MoeTiles(16, 128, 128, 8, 4, *down) for down in [(32, 256, 4, 3), (128, 256, 8, 3), (64, 256, 4, 4),
                                                        (32, 256, 4, 4), (64, 256, 8, 3)]]
PREFILL_TOKENS = [256, 1024, 4096, 8192]
PREFILL_SWEEP = [  # --prefill-sweep: aligned blocks (block_m, then GEMM-1 and GEMM-2 tiles, group_m)
    MoeTiles(bm, *up, *down, group_m=g)
    for bm, up, down, g in [
        (16, (64, 128, 4, 4), (64, 128, 4, 4), 8),
        (32, (64, 128, 4, 4), (64, 128, 4, 4), 8),
        (32, (128, 64, 4, 4), (128, 64, 4, 4), 8),
        (64, (128, 64, 4, 4), (128, 64, 4, 4), 8),
        (64, (128, 128, 4, 3), (128, 128, 4, 3), 8),
        (64, (256, 64, 8, 3), (128, 64, 4, 4), 8),
        (64, (256, 64, 4, 3), (256, 64, 4, 3), 8),
        (64, (128, 64, 4, 5), (128, 64, 4, 5), 8),
        (128, (128, 64, 8, 4), (128, 64, 8, 4), 8),
        (128, (128, 64, 4, 4), (128, 64, 4, 4), 8),
        (128, (256, 64, 8, 3), (256, 64, 8, 3), 8),
        (128, (256, 64, 8, 4), (128, 64, 8, 4), 8),
        (128, (128, 128, 8, 3), (128, 128, 8, 3), 8),
        (128, (256, 128, 8, 3), (128, 128, 8, 3), 8),
        (128, (128, 64, 8, 4), (128, 64, 8, 4), 4),
        (128, (128, 64, 8, 4), (128, 64, 8, 4), 16),
        (128, (256, 64, 8, 4), (256, 64, 8, 4), 16),
    ]
]


def median_us(fn, rep_ms: int = 100) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def make_layer() -> tuple:
    """``(w_up, w_down, w_up_scale, w_down_scale)``: 16-bit weights and no scales, or fp8 codes (``--fp8``)."""
    w_up = (torch.randn(E, 2 * I, H, device=DEV) * H**-0.5).to(DTYPE)  # [E, 2I, H]: gate rows, then up rows
    w_down = (torch.randn(E, H, I, device=DEV) * I**-0.5).to(DTYPE)  # [E, H, I]
    if not FP8:
        return w_up, w_down, None, None
    (w_up, up_scale), (w_down, down_scale) = quantize_fp8_weight(w_up), quantize_fp8_weight(w_down)
    return w_up, w_down, up_scale, down_scale


def route(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's router on random logits: softmax, top-k, renormalised, in the model dtype."""
    weights, ids = torch.randn(tokens, E, device=DEV).softmax(-1).topk(K, -1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(DTYPE)


def moe_args(x, ids, weights, layer) -> tuple:
    return (x, ids, weights, layer[0], layer[1], None, None, "silu", True, False, None, None, layer[2], layer[3])


def run_moe(out: torch.Tensor, args: tuple, tiles: MoeTiles | None) -> None:
    moe_into(out, *args[:12], tiles=tiles, w_up_scale=args[12], w_down_scale=args[13])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return math.inf
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def kernel_table(fn, layers: int, repeats: int = 20) -> dict[str, float]:
    """Device µs per layer of each kernel ``fn`` launches (``--profile``; read with ``AUTODEPLOY_PDL=0``, since
    under programmatic dependent launch a kernel's span includes its wait for the one before)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: round(e.device_time_total / repeats / layers, 2)
            for e in prof.key_averages() if e.device_time_total > 0}


_CASES: dict[int, tuple] = {}  # tokens -> (x, routes, float32 truth of layer 0): one per token count per process


def case(tokens: int, layers: list) -> tuple:
    if tokens not in _CASES:
        x = torch.randn(tokens, H, device=DEV).to(DTYPE)
        routes = [route(tokens) for _ in layers]
        args = moe_args(x, *routes[0], layers[0])
        truth = ops.torch_moe(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                for a in args))
        _CASES[tokens] = (x, routes, truth)
    return _CASES[tokens]


def bench_tokens(tokens: int, layers: list, tiles: MoeTiles | None = None, reference: bool = True) -> dict:
    """Check and time ``triton_moe`` on ``tokens`` tokens; ``layers`` rotate inside the captured graph."""
    x, routes, truth = case(tokens, layers)
    args = moe_args(x, *routes[0], layers[0])
    out = torch.full_like(x, float("nan"))
    run_moe(out, args, tiles)
    row = {"T": tokens, "rel_err": rel_err(out, truth)}
    row["ok"] = row["rel_err"] < REL_TOL
    outs = [torch.empty_like(x) for _ in layers]

    def run_all() -> None:
        for o, (ids, w), layer in zip(outs, routes, layers):
            run_moe(o, moe_args(x, ids, w, layer), tiles)

    if SMOKE:
        row["graph_us"] = median_us(run_all) / len(layers)
    else:
        row["graph_us"] = do_bench_cudagraph(run_all, rep=50, return_mode="median") * 1e3 / len(layers)
    if PROFILE:
        row["kernels_us"] = kernel_table(run_all, len(layers))
    if reference:
        row["torch_us"] = median_us(lambda: ops.torch_moe(*args))
        row["speedup_vs_torch"] = row["torch_us"] / row["graph_us"]
    active = sum(ids.unique().numel() for ids, _ in routes) / len(routes)
    weight_bytes = 1 if FP8 else DTYPE.itemsize
    nbytes = active * 3 * H * I * weight_bytes + 2 * tokens * H * DTYPE.itemsize + tokens * K * 10
    flops = 2.0 * tokens * K * 3 * H * I
    row["active_experts"] = active
    row["roof_us"] = max(nbytes / COPY_BPS, flops / MMA_FLOPS) * 1e6
    row["pct_roof"] = 100 * row["roof_us"] / row["graph_us"]
    row["bound"] = "memory" if nbytes / COPY_BPS > flops / MMA_FLOPS else "compute"
    row["tiles"] = asdict(tiles or default_tiles(tokens * K, E, DTYPE, DEV, tokens == 1, FP8))
    return row


def kernels(results: JsonResults, sweep: bool, token_counts: list[int], prefill_sweep: bool = False) -> bool:
    layers = [make_layer() for _ in range(ROTATE)]
    ok = True
    for tokens in token_counts:
        try:
            row = bench_tokens(tokens, layers)
            ok &= row["ok"]
            results.emit("kernel", **row)
        except Exception:  # noqa: BLE001
            ok = False
            results.emit("kernel", T=tokens, error=traceback.format_exc(limit=4))
    for tiles in DECODE_SWEEP if sweep else []:
        try:
            results.emit("kernel_sweep", **bench_tokens(1, layers, tiles, reference=False))
        except Exception as e:  # noqa: BLE001
            results.emit("kernel_sweep", T=1, tiles=asdict(tiles), error=f"{type(e).__name__}: {e}"[:300])
    for tiles in PREFILL_SWEEP if prefill_sweep else []:
        for tokens in token_counts:
            try:
                results.emit("prefill_sweep", **bench_tokens(tokens, layers, tiles, reference=False))
            except Exception as e:  # noqa: BLE001
                results.emit("prefill_sweep", T=tokens, tiles=asdict(tiles), error=f"{type(e).__name__}: {e}"[:300])
    _CASES.clear()
    del layers
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ok


def compiled_kernels(results: JsonResults) -> None:
    """Registers, spills and shared memory of every MoE GEMM compiled in this process (``--registers``)."""
    from autodeploy.custom_ops.triton import moe as moe_kernels

    for fn in (moe_kernels._moe_up_kernel, moe_kernels._moe_down_kernel):
        for kernel_cache, *_ in getattr(fn, "device_caches", {}).values():  # none under the interpreter
            for kernel in kernel_cache.values():
                consts = getattr(kernel.src, "constexprs", None) or getattr(kernel.src, "constants", {})
                keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "W_SCALED", "DIRECT", "EVEN_K")
                results.emit("compiled", kernel=fn.__name__, **{k: consts.get((fn.arg_names.index(k),), consts.get(k))
                                                                 for k in keys},
                             warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages,
                             shared=kernel.metadata.shared, regs=getattr(kernel, "n_regs", None),
                             spills=getattr(kernel, "n_spills", None))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    parser.add_argument("--out", default=None, help="JSON file for every measurement")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-reference", action="store_true", help="engine figures only: no torch_moe waves")
    parser.add_argument("--sweep", action="store_true", help="also time a few decode tile candidates")
    parser.add_argument("--prefill-sweep", action="store_true",
                        help="time PREFILL_SWEEP's block tiles at --tokens (default 256,1024,4096,8192)")
    parser.add_argument("--profile", action="store_true", help="kernel table of each token count (AUTODEPLOY_PDL=0)")
    parser.add_argument("--registers", action="store_true", help="registers and spills of each compiled MoE GEMM")
    parser.add_argument("--trace-decode", action="store_true",
                        help="torch.profiler: the engine's batch-1 decode graph (run with AUTODEPLOY_PDL=0)")
    parser.add_argument("--decode-tiles", action="store_const", const=DECODE_SWEEP, default=None,
                        help="time the engine's batch-1 decode graph with each decode tile candidate too")
    parser.add_argument("--gemv-variants", action="store_true",
                        help="time the engine's batch-1 decode graph with other GEMV tiles too (moe_e2e.GEMV_VARIANTS)")
    parser.add_argument("--set", action="append", default=[], help="engine config override key=value (YAML value)")
    parser.add_argument("--fp8", action="store_true", help="float8 experts (the engine: quantize=fp8)")
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers of the engine (48)")
    parser.add_argument("--tokens", default=None, help="comma list: the kernel phase's token counts (1,64,512,4096)")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--ref-requests", type=int, default=256, help="one full batch for the torch_moe run")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    args = parser.parse_args()
    if args.fp8:
        args.set.append("quantize=fp8")
    torch.manual_seed(0)
    results = JsonResults(args.out, {"device": "cpu (interpreter)" if SMOKE else torch.cuda.get_device_name(0),
                                     "torch": torch.__version__, "triton": triton.__version__, "smoke": SMOKE})
    ok = True
    if not args.skip_kernels:
        default_tokens = PREFILL_TOKENS if args.prefill_sweep else TOKENS
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else default_tokens
        ok &= kernels(results, args.sweep, tokens, args.prefill_sweep)
        if args.registers:
            compiled_kernels(results)
    if not args.skip_e2e:
        from moe_e2e import run_e2e

        try:
            ok &= run_e2e(args, results.emit, SMOKE)
        except Exception:  # noqa: BLE001
            ok = False
            results.emit("e2e", error=traceback.format_exc(limit=6))
    results.emit("done", ok=ok, total_s=round(results.elapsed(), 1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
