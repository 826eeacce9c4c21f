"""Programmatic dependent launch (``AUTODEPLOY_PDL``) on a decode step's kernel chain, on one GPU.

    PYTHONPATH=$PWD python3 bench/pdl.py --out $OUT/pdl.json        # ~1 min on an H100; --smoke on CPU

A Llama-3.1-8B decoder layer at one token without its attention: add + RMSNorm, the fused qkv GEMV, RoPE on q and
k, the o GEMV, add + RMSNorm, the gate/up GEMV, SiLU-mul, the down GEMV (a torch add stands where attention would
be); ``LAYERS`` layers with their own weights (so L2 holds none), captured in one CUDA graph, for each weight format.
Each chain is captured twice, with ``AUTODEPLOY_PDL=0`` and ``=1``; one JSON line per format gives the µs per layer
of both and whether their outputs are bitwise equal over fresh inputs (the same kernels run, only the launch
differs, so a missing wait would show as a difference). A third capture (PDL on) computes SiLU-mul in the gate/up
GEMV's epilogue (``fuse_glu_linear``); its µs per layer and whether its output equals the PDL chain's are in the
same line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from graph_timing import capture, replay_us  # noqa: E402  (bench/, the script's folder)
from results import JsonResults  # noqa: E402
import autodeploy.custom_ops  # noqa: E402,F401  (registers the ops)
from autodeploy.custom_ops.quant_linear import quantize_fp8_weight, quantize_int4_weight  # noqa: E402
from autodeploy.custom_ops.triton._common import PDL_ENV  # noqa: E402
from autodeploy.custom_ops.triton.gemv import W_DENSE, W_FP8, W_INT4, gemv  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
H, HEADS, KV_HEADS, D, INTER = (64, 4, 2, 16, 128) if SMOKE else (4096, 32, 8, 128, 14336)
LAYERS = 2 if SMOKE else 8
GROUP = 32 if SMOKE else 128
ops = torch.ops.autodeploy


def make_layer(fmt: str) -> dict:
    def linear(n: int, k: int):
        w = (torch.randn(n, k, device=DEV) * k**-0.5).to(torch.bfloat16)
        if fmt == "fp8":
            return quantize_fp8_weight(w)
        if fmt == "int4":
            return quantize_int4_weight(w, GROUP)
        return (w,)

    qkv_out = (HEADS + 2 * KV_HEADS) * D
    return {
        "qkv": linear(qkv_out, H), "o": linear(H, HEADS * D), "gate_up": linear(2 * INTER, H), "down": linear(H, INTER),
        "norm1": 1 + 0.1 * torch.randn(H, device=DEV, dtype=torch.bfloat16),
        "norm2": 1 + 0.1 * torch.randn(H, device=DEV, dtype=torch.bfloat16),
    }


def linear_call(fmt: str, x: torch.Tensor, weights: tuple, glu_activation: str | None = None) -> torch.Tensor:
    if fmt == "int4":
        return gemv(x, W_INT4, weights[0], weights[1], weights[2], None, GROUP, glu_activation=glu_activation)
    if fmt == "fp8":
        return gemv(x, W_FP8, weights[0], weights[1], glu_activation=glu_activation)
    return gemv(x, W_DENSE, weights[0], glu_activation=glu_activation)


def gate_up_silu(fmt: str, h: torch.Tensor, weights: tuple, fused: bool) -> torch.Tensor:
    if fused:
        return linear_call(fmt, h, weights, glu_activation="silu")
    return ops.triton_glu_packed(linear_call(fmt, h, weights), "silu")


def chain(fmt: str, layers: list[dict], x: torch.Tensor, residual: torch.Tensor, cos, sin,
          fused_glu: bool = False) -> torch.Tensor:
    for layer in layers:
        h, residual = ops.triton_fused_add_rmsnorm(x, residual, layer["norm1"], 1e-5)
        qkv = linear_call(fmt, h, layer["qkv"])
        q = qkv[:, : HEADS * D].view(1, 1, HEADS, D)
        k = qkv[:, HEADS * D : (HEADS + KV_HEADS) * D].view(1, 1, KV_HEADS, D)
        q, k = ops.triton_rope(q, cos, sin), ops.triton_rope(k, cos, sin)
        attn = (q.view(1, HEADS, D) + k.view(1, KV_HEADS, D).repeat_interleave(HEADS // KV_HEADS, 1)).view(1, -1)
        x = linear_call(fmt, attn, layer["o"])
        h, residual = ops.triton_fused_add_rmsnorm(x, residual, layer["norm2"], 1e-5)
        x = linear_call(fmt, gate_up_silu(fmt, h, layer["gate_up"], fused_glu), layer["down"])
    return x + residual


def capture_with(fn, pdl: bool):
    """``fn`` captured in a CUDA graph with PDL on or off: ``(graph, output)``; on CPU, ``(None, fn())``."""
    os.environ[PDL_ENV] = "1" if pdl else "0"
    if SMOKE:
        return None, fn()
    return capture(fn)


def bench(fmt: str, results: JsonResults) -> bool:
    torch.manual_seed(0)
    layers = [make_layer(fmt) for _ in range(LAYERS)]
    x = torch.randn(1, H, device=DEV, dtype=torch.bfloat16)
    residual = torch.randn(1, H, device=DEV, dtype=torch.bfloat16)
    pos = torch.arange(D // 2, device=DEV, dtype=torch.float32)
    angle = 37.0 / 10000 ** (2 * pos / D)
    cos = torch.cat([angle.cos(), angle.cos()]).view(1, 1, D)
    sin = torch.cat([angle.sin(), angle.sin()]).view(1, 1, D)
    plain, out_plain = capture_with(lambda: chain(fmt, layers, x, residual, cos, sin), pdl=False)
    pdl, out_pdl = capture_with(lambda: chain(fmt, layers, x, residual, cos, sin), pdl=True)
    fused, out_fused = capture_with(lambda: chain(fmt, layers, x, residual, cos, sin, fused_glu=True), pdl=True)
    checks, fused_checks = [], []
    for _ in range(3):  # fresh inputs each time: the graphs read them from the same buffers
        x.copy_(torch.randn_like(x))
        residual.copy_(torch.randn_like(residual))
        if plain is not None:
            plain.replay()
            pdl.replay()
            fused.replay()
            torch.cuda.synchronize()
        else:
            out_plain, out_pdl = chain(fmt, layers, x, residual, cos, sin), chain(fmt, layers, x, residual, cos, sin)
            out_fused = chain(fmt, layers, x, residual, cos, sin, fused_glu=True)
        checks.append(torch.equal(out_plain, out_pdl) and bool(torch.isfinite(out_pdl).all()))
        fused_checks.append(torch.equal(out_fused, out_pdl))
    timed = [math.nan] * 3 if SMOKE else [replay_us(g, 20) / LAYERS for g in (plain, pdl, fused)]
    row = results.emit(fmt, layers=LAYERS, outputs_equal=all(checks), us_per_layer_plain=timed[0],
                       us_per_layer_pdl=timed[1], saved_us_per_layer=timed[0] - timed[1],
                       fused_glu_equal=all(fused_checks), us_per_layer_fused_glu=timed[2],
                       fused_glu_saved_us_per_layer=timed[1] - timed[2])
    os.environ.pop(PDL_ENV, None)
    return row["outputs_equal"] and row["fused_glu_equal"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    parser.add_argument("--out", default=None)
    parser.add_argument("--fmts", default="dense,fp8,int4")
    args = parser.parse_args()
    results = JsonResults(args.out, {"device": "cpu (interpreter)" if SMOKE else torch.cuda.get_device_name(0),
                                     "torch": torch.__version__})
    ok = all([bench(fmt, results) for fmt in args.fmts.split(",")])
    results.emit("done", ok=ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
