"""Quantized linears on one H100 with Llama-3.1-8B's shapes (random bf16 weights, quantized on the GPU).

    PYTHONPATH=$PWD python3 bench/quant.py --out $OUT/quant.json     # ~4 min: kernels, fp8 engine, int4 engine
    python bench/quant.py --smoke --out /tmp/quant.json               # CPU, Triton interpreter, tiny llama
    options: --only kernels,fp8,int4   --num-requests N (fp8 offline, default 1000)   --set key=value (engines)

One JSON line is printed per measurement (``{"phase": ..., ...}``); ``--out`` gets all of them and the device.

**kernels**: the four linears of one layer (fused qkv, o, fused gate/up, down) for ``ROTATE`` layers with their
own weights, run inside one CUDA graph (so L2 holds no weights over), per format: bf16 ``F.linear``, fp8
(the decode GEMV up to ``FP8_GEMV_MAX_TOKENS``, per-token fp8 activations + ``torch._scaled_mm`` above), int4
group-128 (the GEMV up to ``int4_gemv_max_tokens``, the Triton W4A16 GEMM, dequantize + cuBLAS from ``DEQUANT_MIN_TOKENS``; ``path``). ``us_per_layer``, weight ``GB/s`` and ``rel_err`` against the torch reference.

**fp8 / int4 engines**: ``optimize(config.json, quantize=...)`` with random weights: batch-1 decode tok/s (ISL 128,
``--decode-osl``), the batch-1 decode CUDA-graph replay time, CUDA-graph greedy tokens == eager ones, and for fp8
the offline ``N x 128/128`` output tok/s. Targets (issue 10): fp8 batch-1 >= 320 tok/s, fp8 offline >= 29k tok/s,
int4 batch-1 >= 400 tok/s.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_BENCH), _BENCH]
SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

import autodeploy.custom_ops.triton  # noqa: E402,F401  (Triton ops)
from autodeploy import optimize  # noqa: E402
from autodeploy.bench.decode_graph import decode_replay_ms  # noqa: E402
from autodeploy.bench.engine_bench import run_engine_bench  # noqa: E402
from autodeploy.bench.workload import synthetic_requests  # noqa: E402
from autodeploy.custom_ops.quant_linear import quantize_fp8_weight, quantize_int4_weight  # noqa: E402
from autodeploy.custom_ops.triton.quant_linear import (  # noqa: E402
    FP8_GEMV_MAX_TOKENS, int4_gemv_max_tokens, use_dequant, use_scaled_mm,
)
from e2e import cuda_graph_tokens_match  # noqa: E402
from results import JsonResults  # noqa: E402

ops = torch.ops.autodeploy
DEV = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float32 if SMOKE else torch.bfloat16
H, I, NQ, NKV, D = (64, 96, 4, 2, 16) if SMOKE else (4096, 14336, 32, 8, 128)
LAYER_SHAPES = {  # name: (N, K)
    "qkv": ((NQ + 2 * NKV) * D, H), "o": (H, NQ * D), "gate_up": (2 * I, H), "down": (H, I),
}
TOKENS = [1, 19] if SMOKE else [1, 4, 8, 16, 64, 256, 2048]
ROTATE = 2 if SMOKE else 4
COPY_BPS = 3.0e12  # H100 copy bandwidth (measured)
REL_TOL = 2e-2
MODEL = "examples/configs/llama-3.1-8b/config.json"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return math.inf
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def time_us(fn) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


# ---- kernels -----------------------------------------------------------------------------------------------------
def make_layers(fmt: str) -> list[dict[str, tuple]]:
    """``ROTATE`` layers of (op, weight args) per linear; bf16 weights are made and quantized one at a time."""
    layers = []
    for _ in range(ROTATE):
        layer = {}
        for name, (n, k) in LAYER_SHAPES.items():
            w = (torch.randn(n, k, device=DEV) * k**-0.5).to(DTYPE)
            if fmt == "bf16":
                layer[name] = (w,)
            elif fmt == "fp8":
                layer[name] = quantize_fp8_weight(w)
            else:
                q, s, z = quantize_int4_weight(w, 128)
                layer[name] = (q, s, z)
            del w
        layers.append(layer)
    return layers


def run_linear(fmt: str, x: torch.Tensor, args: tuple) -> torch.Tensor:
    if fmt == "bf16":
        return torch.nn.functional.linear(x, args[0])
    if fmt == "fp8":
        return ops.triton_quant_fp8_linear(x, *args, None)
    return ops.triton_quant_int4_linear(x, *args, None, 128)


def reference(fmt: str, x: torch.Tensor, args: tuple) -> torch.Tensor:
    if fmt == "fp8":
        return ops.torch_quant_fp8_linear(x.float(), *args, None)
    return ops.torch_quant_int4_linear(x.float(), *args, None, 128)


def weight_bytes(layer: dict[str, tuple]) -> int:
    return sum(t.numel() * t.element_size() for args in layer.values() for t in args if t is not None)


def bench_kernels(res: JsonResults) -> None:
    for fmt in ("bf16", "fp8", "int4"):
        layers = make_layers(fmt)
        nbytes = weight_bytes(layers[0])
        for m in TOKENS:
            xs = {name: torch.randn(m, k, device=DEV).to(DTYPE) for name, (n, k) in LAYER_SHAPES.items()}
            row = {"fmt": fmt, "M": m, "weight_MB_per_layer": round(nbytes / 1e6, 1)}
            if fmt != "bf16":
                errs = [rel_err(run_linear(fmt, xs[name], args), reference(fmt, xs[name], args))
                        for name, args in layers[0].items()]
                row["rel_err"] = max(errs)
                row["ok"] = row["rel_err"] < REL_TOL
            x_o = xs["o"].reshape(m, -1)
            if m <= {"bf16": 0, "fp8": FP8_GEMV_MAX_TOKENS, "int4": int4_gemv_max_tokens(x_o, 128)}[fmt]:
                row["path"] = "gemv"
            elif fmt == "fp8":
                row["path"] = "scaled_mm" if use_scaled_mm(x_o, layers[0]["o"][0]) else "triton"
            elif fmt == "int4":
                row["path"] = "dequant+cublas" if use_dequant(x_o) else "triton"

            def run_all() -> None:
                for layer in layers:
                    for name, args in layer.items():
                        run_linear(fmt, xs[name], args)

            row["us_per_layer"] = time_us(run_all) / len(layers)
            row["weight_GB_s"] = nbytes / row["us_per_layer"] / 1e3
            row["roof_us_per_layer"] = nbytes / COPY_BPS * 1e6
            res.emit("kernels", **row)
        del layers
        gc.collect()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()


# ---- engines -----------------------------------------------------------------------------------------------------
def build_engine(quantize: str, args, extra: dict):
    if SMOKE:  # the Triton kernels under the interpreter, on a tiny llama
        from autodeploy.models.tiny import tiny_model

        fmt = "fp8" if quantize == "fp8" else "int4"
        return optimize(tiny_model("llama"), device="cpu", quantize=quantize, max_batch_size=8, max_seq_len=256,
                        **{f"transforms.quantize_{fmt}_linear.backend": "triton", **extra})
    return optimize(args.model, dtype="bfloat16", random_weights=True, quantize=quantize,
                    max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens, max_seq_len=2048, **extra)


def bench_engine(res: JsonResults, quantize: str, args, extra: dict) -> None:
    start = time.perf_counter()
    engine = build_engine(quantize, args, extra)
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    row = {"quantize": quantize, "optimize_s": round(time.perf_counter() - start, 1)}
    row["quant_ops"] = sorted({str(n.target) for n in engine.runner.gm.graph.nodes
                               if n.op == "call_function" and "quant" in str(n.target)})
    res.emit(f"{quantize}_build", **row)
    vocab = engine.vocab_size
    isl, osl = (16, 4) if SMOKE else (128, args.decode_osl)
    run_engine_bench(engine, synthetic_requests(4, isl, 8, vocab, seed=1), 0, name="warm-up")
    if DEV.type == "cuda":
        res.emit(f"{quantize}_graphs", cuda_graph_tokens_match_eager=cuda_graph_tokens_match(engine, vocab))
    r = run_engine_bench(engine, synthetic_requests(2 if SMOKE else 3, isl, osl, vocab, seed=2), 1, name="batch-1 decode")
    row = {"batch1_decode_tok_s": 1e3 / r.itl_p50_ms, "batch1_itl_p99_ms": r.itl_p99_ms}
    if DEV.type == "cuda":
        row["batch1_graph_replay_ms"] = decode_replay_ms(engine.runner)
    row["target_tok_s"] = 320 if quantize == "fp8" else 400
    res.emit(f"{quantize}_decode", **row)
    if quantize == "fp8" and args.num_requests:
        n = 4 if SMOKE else args.num_requests
        r = run_engine_bench(engine, synthetic_requests(n, isl, 4 if SMOKE else 128, vocab, seed=4), 0, name="offline")
        res.emit("fp8_offline", num_requests=n, output_tok_s=r.output_tok_per_s, requests_s=r.requests_per_s,
                 ttft_p50_ms=r.ttft_p50_ms, itl_p50_ms=r.itl_p50_ms, peak_memory_gib=r.peak_memory_gib,
                 target_tok_s=29000)
    del engine
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--only", default="kernels,fp8,int4")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--decode-osl", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=1024)
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    parser.add_argument("--set", action="append", default=[], help="engine override key=value (YAML value)")
    args = parser.parse_args()
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    res = JsonResults(args.out, {"device": "cpu (interpreter)" if SMOKE else torch.cuda.get_device_name(0),
                                 "torch": torch.__version__, "triton": triton.__version__, "smoke": SMOKE})
    torch.manual_seed(0)
    phases = args.only.split(",")
    for phase in phases:
        try:
            if phase == "kernels":
                bench_kernels(res)
            elif phase in ("fp8", "int4"):
                bench_engine(res, "fp8" if phase == "fp8" else "int4_weight_only", args, extra)
            else:
                res.emit("error", step=phase, error="unknown phase (kernels, fp8, int4)")
        except Exception as e:  # one failed phase must not lose the others' numbers
            res.emit("error", step=phase, error=repr(e), traceback=traceback.format_exc()[-2000:])
            gc.collect()
            if DEV.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
