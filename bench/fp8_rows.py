"""Per-token fp8 activation quantization (``fp8_quantize_rows``) on one GPU: each row read once (the default up to
16384 columns) against read twice (``max_block`` below the row, the kernel's earlier form), at the offline
workload's token counts (about 1000 decodes, 8192 prefill tokens) and Llama-3.1-8B's K (4096; 14336 for down).

    PYTHONPATH=$PWD python3 bench/fp8_rows.py --out $OUT/fp8_rows.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from graph_timing import capture, replay_us  # noqa: E402  (bench/, the script's folder)
from results import JsonResults  # noqa: E402
from autodeploy.custom_ops.triton.quant_linear import fp8_quantize_rows  # noqa: E402
from autodeploy.custom_ops.quant_linear import quantize_fp8_per_token  # noqa: E402

CASES = [(1000, 4096), (1000, 14336), (8192, 4096), (8192, 14336)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = JsonResults(args.out, {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d")})
    for m, k in CASES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref_q, ref_scale = quantize_fp8_per_token(x)
        row = {"M": m, "K": k, "GB": round(m * k * 3 / 1e9, 4)}
        for name, max_block in (("one_pass", 16384), ("two_pass", max(512, k // 2))):
            q, scale = fp8_quantize_rows(x, max_block)
            torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)  # codes may round apart (division)
            torch.testing.assert_close(q.float() * scale, ref_q.float() * ref_scale, rtol=0.07, atol=1e-30)
            row[f"{name}_codes_unlike_torch"] = int((q.view(torch.uint8) != ref_q.view(torch.uint8)).sum())
            graph, _ = capture(lambda: fp8_quantize_rows(x, max_block))
            us = replay_us(graph)
            row[name] = {"us": round(us, 2), "TB/s": round(m * k * 3 / us / 1e6, 2)}
        results.add(row)


if __name__ == "__main__":
    main()
