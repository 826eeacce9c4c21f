"""Does the decode GEMV's weight layout limit it? Row-major weights against the same weights stored tile by tile
(``gemv_tile_layout``: each program's K steps one contiguous block), same tiles, on one GPU.

    PYTHONPATH=$PWD python3 bench/gemv_layout.py --out $OUT/gemv_layout.json     # ~1 min on an H100

In row-major order a program's step reads ``block_k`` bytes (int4: 64) from each of its rows, rows 2-7 KB apart;
tiled, the same step is one contiguous block. For Llama-3.1-8B's four linears at M = 1, each format's default
tiles (``gemv_config``) and a few others, µs per call (weights rotated past L2) in both layouts.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from gemv import COPIES, GROUP, SHAPE_SETS, graph_us, make_weights, nbytes  # noqa: E402  (bench/)
from results import JsonResults  # noqa: E402

EXTRA_TILES = {  # beside the defaults: (block_n, block_k, split_k, warps, stages, tensor_cores)
    "int4": [(64, 128, 1, 4, 4, True), (128, 128, 1, 8, 3, True), (64, 128, 4, 4, 4, True), (128, 128, 8, 8, 3, True),
             (32, 128, 1, 4, 4, True)],
    "fp8": [(128, 128, 1, 4, 4, True), (64, 256, 4, 8, 3, True), (8, 1024, 1, 4, 2), (16, 512, 1, 4, 3)],
    "dense": [(2, 2048, 1, 4, 1), (4, 512, 1, 4, 2)],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--fmts", default="int4,fp8,dense")
    args = parser.parse_args()
    import autodeploy.custom_ops.triton  # noqa: F401
    from autodeploy.custom_ops.triton.gemv import (
        W_DENSE, W_FP8, W_INT4, GemvConfig, gemv, gemv_config, gemv_tile_layout,
    )

    codes = {"int4": W_INT4, "fp8": W_FP8, "dense": W_DENSE}
    res = JsonResults(args.out, {"device": torch.cuda.get_device_name(0), "torch": torch.__version__})
    torch.manual_seed(0)
    for fmt in args.fmts.split(","):
        code = codes[fmt]
        for name, (n, k) in SHAPE_SETS["llama"].items():
            ws = make_weights(fmt, n, k, COPIES)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            default = gemv_config(1, n, k, code, x.device)
            tiles = [default] + [GemvConfig(*t) for t in EXTRA_TILES[fmt] if GemvConfig(*t) != default]
            for cfg in tiles:
                def call(w, tiled):
                    rest = (w[1], w[2], None, GROUP) if fmt == "int4" else w[1:]
                    return gemv(x, code, w[0], *rest, config=cfg, tiled=tiled)

                try:
                    tiled_ws = [(gemv_tile_layout(w[0], code, cfg), *w[1:]) for w in ws]
                    row_us = graph_us(lambda: [call(w, False) for w in ws], COPIES)
                    tile_us = graph_us(lambda: [call(w, True) for w in tiled_ws], COPIES)
                    same = torch.equal(call(ws[0], False), call(tiled_ws[0], True))
                except Exception as e:  # noqa: BLE001  (an illegal tile is reported, not fatal)
                    res.emit("error", fmt=fmt, shape=name, cfg=str(cfg), error=repr(e)[:200])
                    continue
                size = nbytes(ws[0])
                res.emit("layout", fmt=fmt, shape=name, default=cfg == default, cfg=[*vars(cfg).values()],
                         row_major_us=round(row_us, 2), tiled_us=round(tile_us, 2),
                         row_major_GB_s=round(size / row_us / 1e3), tiled_GB_s=round(size / tile_us / 1e3),
                         same_output=same)
                del tiled_ws
            del ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
