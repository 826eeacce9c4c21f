"""fp8 activations made by their producer against the producer + the separate quantization, one GPU.

    PYTHONPATH=$PWD python3 bench/fp8_activations.py --out $OUT/fp8_activations.json   # ~30 s on an H100

Llama-3.1-8B's widths (hidden 4096, MLP 14336) at a decode step's and a mixed step's token counts. Per case,
CUDA-graph replay µs of: the add + RMSNorm then ``fp8_quantize_rows`` (what the fp8 linear before
``fuse_fp8_act_quant`` launched), the add + RMSNorm writing codes (``triton_fused_add_rmsnorm_fp8``); the SiLU-mul
then the quantization, and the SiLU-mul writing codes (``glu_fp8_launch``: its default chunk and warps, and others).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from graph_timing import capture, replay_us  # noqa: E402  (bench/, the script's folder)
from results import JsonResults  # noqa: E402
from autodeploy.custom_ops.quant_linear import FP8_DTYPE  # noqa: E402
from autodeploy.custom_ops.triton import fp8_activations  # noqa: E402, F401  (registers the ops)
from autodeploy.custom_ops.triton.glu import glu_fp8_launch, glu_packed_launch  # noqa: E402
from autodeploy.custom_ops.triton.quant_linear import fp8_quantize_rows  # noqa: E402

ops = torch.ops.autodeploy
HIDDEN, INTER = 4096, 14336


def graph_us(fn) -> float:
    graph, _ = capture(fn)
    return round(replay_us(graph), 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="16,1000,8192")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    res = JsonResults(args.out, {"device": torch.cuda.get_device_name(0)})
    dev, bf16 = "cuda", torch.bfloat16
    for m in (int(t) for t in args.tokens.split(",")):
        x, r = (torch.randn(m, HIDDEN, device=dev, dtype=bf16) for _ in range(2))
        w = torch.rand(HIDDEN, device=dev, dtype=bf16) + 0.5
        gate_up = torch.randn(m, 2 * INTER, device=dev, dtype=bf16)
        h = torch.empty(m, INTER, device=dev, dtype=bf16)
        codes = torch.empty(m, INTER, device=dev, dtype=FP8_DTYPE)
        scales = torch.empty(m, 1, device=dev, dtype=torch.float32)

        def norm_then_quant():
            y, _ = ops.triton_fused_add_rmsnorm(x, r, w, 1e-5)
            return fp8_quantize_rows(y)

        def glu_then_quant():
            glu_packed_launch(gate_up, "silu", h)
            return fp8_quantize_rows(h)

        res.add({
            "tokens": m,
            "norm_then_quant_us": graph_us(norm_then_quant),
            "norm_codes_us": graph_us(lambda: ops.triton_fused_add_rmsnorm_fp8(x, r, w, 1e-5)),
            "norm_only_us": graph_us(lambda: ops.triton_fused_add_rmsnorm(x, r, w, 1e-5)),
            "glu_then_quant_us": graph_us(glu_then_quant),
            "glu_codes_us": graph_us(lambda: glu_fp8_launch(gate_up, "silu", codes, scales)),
            "glu_only_us": graph_us(lambda: glu_packed_launch(gate_up, "silu", h)),
            **{f"glu_codes_{block}x{warps}_us": graph_us(lambda: glu_fp8_launch(gate_up, "silu", codes, scales,
                                                                               block=block, warps=warps))
               for block, warps in ((1024, 4), (2048, 4), (4096, 8), (4096, 16), (1024, 8))},
        })


if __name__ == "__main__":
    main()
