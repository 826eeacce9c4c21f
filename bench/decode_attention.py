"""Decode attention tiles on one GPU, bf16 and fp8 KV caches: which tile (keys, warps, stages, register cap)
``decode_tile_for`` should pick.

    PYTHONPATH=$PWD python3 bench/decode_attention.py --out $OUT/decode_attention.json   # ~3 min on an H200
    python bench/decode_attention.py --smoke                                            # CPU, interpreter

Llama-3.1-8B's attention shapes (32 query heads, 8 KV heads, head dim 128, pages of 16) on the batches a
decode step sees: one sequence of 384 and of 4096 tokens, 64 of 1024, 256 of 2048, and 1000 of 192 (the offline
128/128 workload's mean). Every tile (``--tiles`` or the sweep, plus the one ``decode_tile_for`` picks) is run
against ``torch_cached_attention`` (its relative error recorded), then timed by CUDA-graph replay of ``ROTATE``
layers' worth of pools so L2 holds none of them; one JSON line per (case, cache dtype) with the µs of the
4-warp default, of the picked tile and of the best one, and the best's GB/s of KV read.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from graph_timing import capture, replay_us  # noqa: E402  (bench/, the script's folder)
from kernels import HEAD_DIM, kv_bytes, paged_batch  # noqa: E402
from results import JsonResults  # noqa: E402
from autodeploy.custom_ops.triton.attention_tiles import decode_tile_for, default_config  # noqa: E402
from autodeploy.custom_ops.triton.cached_attention import cached_attention_into  # noqa: E402

ops = torch.ops.autodeploy
ROTATE = 1 if SMOKE else 4
CASES = ([("b1 ctx40", [(39, 1)]), ("b5 ctx20", [(19, 1)] * 5)] if SMOKE else
         [("b1 ctx384", [(383, 1)]), ("b1 ctx4096", [(4095, 1)]), ("b64 ctx1024", [(1023, 1)] * 64),
          ("b256 ctx2048", [(2047, 1)] * 256), ("b1000 ctx192", [(191, 1)] * 1000)])
TILES = [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 4, 3), (32, 2, 2), (32, 2, 3), (64, 2, 3), (16, 1, 2),
         (16, 1, 3), (32, 1, 2), (32, 1, 3), (64, 1, 2), (16, 1, 2, 128), (32, 1, 2, 128), (32, 1, 3, 128),
         (64, 1, 2, 128), (32, 2, 2, 128), (64, 2, 3, 128), (32, 4, 3, 128), (64, 4, 3, 128), (128, 4, 3, 128),
         (64, 4, 3, 96), (64, 4, 2, 96), (32, 4, 3, 80)]
# (decode_block_n, decode_warps, decode_stages[, decode_maxnreg])


def graph_us(fn) -> float:
    if SMOKE:
        fn()
        return 0.0
    graph, _ = capture(fn)
    return replay_us(graph)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiles", default=None, help="'n,warps,stages[,maxnreg];...' instead of the sweep")
    args = parser.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";")] if args.tiles else TILES
    res = JsonResults(args.out, {"device": "cpu" if SMOKE else torch.cuda.get_device_name(0)})
    torch.manual_seed(0)
    for name, seqs in CASES:
        for cache in ("bf16", "fp8"):
            layers = [paged_batch(seqs, 0) for _ in range(ROTATE)]
            if cache == "fp8":
                for inp in layers:
                    inp["k_cache"] = inp["k_cache"].to(torch.float8_e4m3fn)
                    inp["v_cache"] = inp["v_cache"].to(torch.float8_e4m3fn)
            base = default_config(HEAD_DIM, torch.bfloat16, layers[0]["q"].device)
            outs = [torch.empty_like(inp["q"]) for inp in layers]
            ref = ops.torch_cached_attention(**{k: v.clone() for k, v in layers[0].items()})
            nbytes = kv_bytes(seqs) // (2 if cache == "fp8" else 1)
            row = {"case": name, "cache": cache, "GB": round(nbytes / 1e9, 3)}
            pick = decode_tile_for(len(seqs) * layers[0]["k"].shape[2], layers[0]["k_cache"].dtype, HEAD_DIM,
                                   layers[0]["q"].device, base)  # what the engine launches for this batch
            chosen = (pick.decode_block_n, pick.decode_warps, pick.decode_stages, pick.decode_maxnreg)
            chosen = chosen if chosen[3] else chosen[:3]
            timings = []
            for tile in tiles if chosen in tiles else [*tiles, chosen]:
                n, w, s, regs = (*tile, None)[:4]
                cfg = replace(base, decode_block_n=n, decode_warps=w, decode_stages=s, decode_maxnreg=regs)
                try:
                    cached_attention_into(outs[0], **{k: v.clone() for k, v in layers[0].items()}, config=cfg)
                    err = ((outs[0].float() - ref.float()).norm() / ref.float().norm()).item()
                    us = graph_us(lambda: [cached_attention_into(o, **inp, config=cfg) for o, inp in zip(outs, layers)])
                except Exception as e:  # noqa: BLE001  (a tile that does not fit: recorded, skipped)
                    row.setdefault("errors", []).append(f"{tile}: {type(e).__name__}")
                    continue
                timings.append((round(us / ROTATE, 2), tile, round(err, 5)))
            timings.sort()
            base_tile = (base.decode_block_n, base.decode_warps, base.decode_stages)
            default = next((t for t in timings if t[1] == base_tile), None)
            picked = next((t for t in timings if t[1] == chosen), None)
            row.update(default=default, chosen=picked, best=timings[0] if timings else None, all=timings)
            if timings and not SMOKE:
                row["best_GB_s"] = round(nbytes / (timings[0][0] * 1e-6) / 1e9)
            res.add(row)


if __name__ == "__main__":
    main()
