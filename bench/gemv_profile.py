"""One decode-GEMV config on one Llama-3.1-8B linear, called a few times eagerly, for Nsight Compute to profile.

    ncu -k regex:_gemv_kernel -s 3 -c 1 --section WarpStateStats python3 bench/gemv_profile.py --fmt int4 --shape o

``--cfg`` is a ``GemvConfig`` as ``block_n,block_k,split_k,warps,stages,tensor_cores`` (default: ``gemv_config``'s).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from gemv import SHAPE_SETS, gemv_call, make_weights  # noqa: E402  (bench/gemv.py)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fmt", default="int4", choices=["int4", "fp8", "int8", "dense"])
    parser.add_argument("--shape", default="o", choices=sorted(SHAPE_SETS["llama"]))
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--cfg", default=None)
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args()
    import autodeploy.custom_ops.triton  # noqa: F401

    n, k = SHAPE_SETS["llama"][args.shape]
    weights = make_weights(args.fmt, n, k, 1)[0]
    x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
    cfg = None
    if args.cfg:
        parts = args.cfg.split(",")
        cfg = (*[int(p) for p in parts[:5]], *(p.strip().lower() == "true" for p in parts[5:]))
    for _ in range(args.calls):
        gemv_call(args.fmt, x, weights, cfg)
    torch.cuda.synchronize()
    print(f"{args.fmt} {args.shape} M={args.tokens} cfg={cfg}: {args.calls} calls")


if __name__ == "__main__":
    main()
