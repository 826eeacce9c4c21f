"""The engine phase of ``bench/moe.py``: Qwen3-30B-A3B (random bf16 weights, built on the GPU) end to end.

1. ``build``: ``autodeploy.optimize`` on ``examples/configs/qwen3-30b-a3b/config.json`` (``--layers`` rewrites
   the depth); every MoE must be ``triton_moe``.
2. ``decode``: batch-1 decode tok/s (ITL median, CUDA graphs) against the roofline ``3.0 TB/s / bytes of the
   parameters a token reads`` (attention, norms, router, top-8 experts of every layer, LM head); target 70%, on an
   H100 (``meets_target`` is null on other cards); ``pct_card_roofline`` uses this card's measured copy instead.
   ``replay_ms`` is the captured step alone (no host work); ``--trace-decode`` adds its kernel table.
3. ``offline``: ``--num-requests`` x 128/128, all submitted at once (target: >= 3x the reference's).
   ``--decode-tiles`` then times the batch-1 decode graph again with each candidate of ``moe.py``'s sweep as the
   one-token MoE tiles (the graph captured anew for each); ``--gemv-variants`` the same with other decode GEMV
   tiles (``GEMV_VARIANTS``).
4. ``wave``: the reference needs ~0.6 s per step (a host sync per expert, 48 layers; no CUDA graphs), so a
   1000-request run would take ~6 minutes. With every request the same length the offline run is a train of
   identical waves of ``--max-batch-size`` requests, so for each backend one wave is measured in two parts on
   the same engine: ``A`` = ``--ref-requests`` x 128/1 (the prefill steps) and ``B`` = the same x 128/33;
   ``decode_step = (B - A) / 32`` and a 128/128 wave takes ``A + 127 * decode_step``. ``triton`` runs it with
   CUDA graphs (its offline number above checks the model: ``model_vs_measured``), ``torch`` with every MoE
   node pointed back at ``torch_moe`` and graphs off. ``speedup_offline`` = the measured offline tok/s over
   the reference's modelled one; ``speedup_same_workload`` compares the two ``B`` runs as measured.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from typing import Callable

import torch
import yaml

from autodeploy import optimize
from autodeploy.bench.decode_graph import decode_graph_profile, decode_replay_ms
from autodeploy.bench.engine_bench import run_engine_bench
from autodeploy.bench.workload import synthetic_requests
from autodeploy.custom_ops.triton import gemv as gemv_kernels
from autodeploy.custom_ops.triton import moe as moe_kernels
from autodeploy.custom_ops.triton._common import next_pow2
from autodeploy.custom_ops.triton.gemv import W_DENSE, GemvConfig
from autodeploy.custom_ops.triton.moe import MoeTiles
from autodeploy.transforms import get_history
from copy_bandwidth import copy_bytes_per_s  # bench/, the script's folder

ops = torch.ops.autodeploy
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples/configs/qwen3-30b-a3b/config.json")
COPY_BPS = 3.0e12
DECODE_TARGET_PCT, OFFLINE_TARGET_X = 70.0, 3.0
TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512, num_hidden_layers=2,
            max_window_layers=2, bos_token_id=1, eos_token_id=2)


def model_config(layers: int | None, smoke: bool) -> tuple[str, dict]:
    with open(CONFIG) as f:
        cfg = json.load(f)
    if smoke:
        cfg.update(TINY)
    if layers:
        cfg["num_hidden_layers"] = cfg["max_window_layers"] = layers
    path = os.path.join(tempfile.mkdtemp(prefix="qwen3_moe_"), "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path, cfg


def active_param_bytes(cfg: dict) -> int:
    """Bytes (bf16) a decode token reads: attention, norms, router and top-k experts of every layer, the LM head."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    attention = h * nq * hd + 2 * h * nkv * hd + nq * hd * h
    experts = cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"]
    layer = attention + 2 * h + 2 * hd + h * cfg["num_experts"] + experts
    return 2 * (cfg["num_hidden_layers"] * layer + cfg["vocab_size"] * h + h)


def engine_active_bytes(gm, cfg: dict) -> int:
    """Bytes of the engine's own parameters a decode token reads (as stored: fp8 codes count one byte): all but the
    embedding table, the experts' share ``top_k / E``."""
    share = cfg["num_experts_per_tok"] / cfg["num_experts"]
    total = 0.0
    for name, p in gm.named_parameters():
        if "embed_tokens" not in name:
            total += p.numel() * p.element_size() * (share if ".experts." in name else 1.0)
    return int(total)


def point_moe_at(engine, target) -> int:
    """Point every MoE node of the engine's graph at ``target`` (``torch_moe`` or ``triton_moe``)."""
    gm = engine.runner.gm
    nodes = [n for n in gm.graph.nodes if n.target in (ops.torch_moe.default, ops.triton_moe.default)]
    for node in nodes:
        node.target = target
    gm.recompile()
    return len(nodes)


def wave(engine, requests: int, isl: int, decode_steps: int, vocab: int) -> dict:
    """One wave of ``requests`` x ``isl``/``decode_steps + 1`` in two measured parts (see the module doc)."""
    a = run_engine_bench(engine, synthetic_requests(requests, isl, 1, vocab, seed=21), 0, name="wave A").elapsed_s
    b_run = run_engine_bench(engine, synthetic_requests(requests, isl, decode_steps + 1, vocab, seed=22), 0,
                             name="wave B")
    step = (b_run.elapsed_s - a) / decode_steps
    full_s = a + (isl - 1) * step  # a 128/128 wave: the prefill steps give token 1, then 127 decode steps
    return {"requests": requests, "A_s": a, "B_s": b_run.elapsed_s, "B_tok_s": b_run.output_tok_per_s,
            "decode_step_ms": 1e3 * step, "wave_128_128_s": full_s, "modelled_tok_s": requests * isl / full_s}


def _whole_row(m, n, k, fmt, device):  # every program's weights read before it waits for the kernel before
    return GemvConfig(4, next_pow2(k), 1, 4, 1) if m == 1 and fmt == W_DENSE and k <= 4096 else None


def _isolated_bests(m, n, k, fmt, device):  # run 33's bench/gemv.py --shapes qwen3-moe bests for o and the LM head
    if m == 1 and fmt == W_DENSE and n >= 65536:
        return GemvConfig(4, 2048, 2, 8, 1)
    return GemvConfig(4, 2048, 1, 4, 1) if m == 1 and fmt == W_DENSE and k == 4096 else None


GEMV_VARIANTS = {"whole_row": _whole_row, "isolated_bests": _isolated_bests}


def replay_with_gemv(runner, choose) -> float:
    """The batch-1 decode replay (ms) with ``choose(m, n, k, fmt, device)`` picking the GEMV tiles where it returns
    one (the graph of batch 1 captured anew)."""
    default = gemv_kernels.gemv_config
    gemv_kernels.gemv_config = lambda *a: choose(*a) or default(*a)
    try:
        runner.capture_cuda_graphs(1)
        return decode_replay_ms(runner)
    finally:
        gemv_kernels.gemv_config = default


def replay_with_tiles(runner, tiles: MoeTiles) -> float:
    """The batch-1 decode replay (ms) with every one-token MoE launched with ``tiles``: the graph of batch 1 is
    captured again (the decode graphs of other sizes are dropped); the defaults come back afterwards."""
    default = moe_kernels.default_tiles
    moe_kernels.default_tiles = lambda m, e, dtype, device, one_token=False, fp8_weights=False: (
        tiles if one_token else default(m, e, dtype, device, one_token, fp8_weights))
    try:
        runner.capture_cuda_graphs(1)
        return decode_replay_ms(runner)
    finally:
        moe_kernels.default_tiles = default


def run_e2e(args, emit: Callable[..., dict], smoke: bool) -> bool:
    path, cfg = model_config(args.layers, smoke)
    start = time.perf_counter()
    engine = optimize(
        path,
        dtype="float32" if smoke else "bfloat16",
        random_weights=True,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        max_seq_len=512,
        **({"transforms.fuse_moe.backend": "triton"} if smoke else {}),
        **{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in getattr(args, "set", []))},
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gm = engine.runner.gm
    fused = sum(n.target == ops.triton_moe.default for n in gm.graph.nodes)
    info = get_history(gm).get("fuse_moe")
    emit("build", layers=cfg["num_hidden_layers"], optimize_s=time.perf_counter() - start, triton_moe_layers=fused,
         fuse_moe=info.details if info is not None else None)
    ok = fused == cfg["num_hidden_layers"]
    vocab = engine.vocab_size
    run_engine_bench(engine, synthetic_requests(8, 128, 4, vocab, seed=1), 0, name="warm-up")

    active = engine_active_bytes(gm, cfg)
    roof_tok_s = COPY_BPS / active
    r = run_engine_bench(engine, synthetic_requests(3, 128, 16 if smoke else 256, vocab, seed=2), 1, name="decode")
    tok_s = 1e3 / r.itl_p50_ms
    replay = decode_replay_ms(engine.runner, replays=20) if engine.runner.cuda_graphs is not None else None
    pct = 100 * tok_s / roof_tok_s
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    card_bps = copy_bytes_per_s() if torch.cuda.is_available() else None
    emit("decode", batch=1, tok_s=tok_s, itl_p50_ms=r.itl_p50_ms, replay_ms=replay,
         active_param_GB=active / 1e9, bf16_active_param_GB=active_param_bytes(cfg) / 1e9,
         roofline_tok_s=roof_tok_s, pct_roofline=pct,
         pct_roofline_replay=100 * (1e3 / replay) / roof_tok_s if replay else None, target_pct=DECODE_TARGET_PCT,
         meets_target=pct >= DECODE_TARGET_PCT if "H100" in card else None,  # the target's 3.0 TB/s is an H100's
         card=card, card_copy_GBps=card_bps / 1e9 if card_bps else None,
         pct_card_roofline=100 * tok_s * active / card_bps if card_bps else None)
    if getattr(args, "trace_decode", False) and replay is not None:  # read with AUTODEPLOY_PDL=0 (spans)
        emit("decode_kernels", **decode_graph_profile(engine.runner, top=30))

    n = 4 if smoke else args.num_requests
    r = run_engine_bench(engine, synthetic_requests(n, 128, 8 if smoke else 128, vocab, seed=4), 0, name="offline")
    emit("offline", backend="triton", requests=n, isl=128, osl=8 if smoke else 128, tok_s=r.output_tok_per_s,
         elapsed_s=r.elapsed_s, itl_p50_ms=r.itl_p50_ms, ttft_p50_ms=r.ttft_p50_ms, peak_gib=r.peak_memory_gib)
    offline_tok_s = r.output_tok_per_s
    if getattr(args, "decode_tiles", None):
        experts, top_k = cfg["num_experts"], cfg["num_experts_per_tok"]
        default = moe_kernels.default_tiles(top_k, experts, torch.bfloat16, torch.device("cuda"), one_token=True)
        for tiles in [default, *args.decode_tiles]:
            emit("decode_tiles", tiles=asdict(tiles), replay_ms=replay_with_tiles(engine.runner, tiles))
    if getattr(args, "gemv_variants", False):
        emit("decode_gemv", variant="default", replay_ms=replay_with_gemv(engine.runner, lambda *a: None))
        for name, choose in GEMV_VARIANTS.items():
            emit("decode_gemv", variant=name, replay_ms=replay_with_gemv(engine.runner, choose))
    if getattr(args, "skip_reference", False):
        engine.shutdown()
        return ok

    ref_requests, isl, steps = (4, 16, 4) if smoke else (min(args.ref_requests, args.max_batch_size), 128, 32)
    waves = {"triton": wave(engine, ref_requests, isl, steps, vocab)}
    if not smoke:
        waves["triton"]["model_vs_measured"] = waves["triton"]["modelled_tok_s"] / offline_tok_s
    emit("wave", backend="triton", cuda_graphs=engine.runner.cuda_graphs is not None, **waves["triton"])
    runner = engine.runner
    graphs = runner.cuda_graphs, runner.prefill_graphs
    runner.cuda_graphs = runner.prefill_graphs = None  # the reference cannot be captured
    try:
        point_moe_at(engine, ops.torch_moe.default)
        waves["torch"] = wave(engine, ref_requests, isl, steps, vocab)
        emit("wave", backend="torch_moe", cuda_graphs=False, **waves["torch"])
    finally:
        point_moe_at(engine, ops.triton_moe.default)
        runner.cuda_graphs, runner.prefill_graphs = graphs
    speedup = offline_tok_s / waves["torch"]["modelled_tok_s"]
    emit("speedup", speedup_offline=speedup,
         speedup_same_workload=waves["triton"]["B_tok_s"] / waves["torch"]["B_tok_s"],
         target_x=OFFLINE_TARGET_X, meets_target=speedup >= OFFLINE_TARGET_X)
    engine.shutdown()
    return ok
