"""End-to-end GPU benchmark in one process: HF generate baselines, then the engine on the same shapes.

    python bench/e2e.py --model examples/configs/llama-3.1-8b/config.json [--skip-hf] [--json $OUT/e2e.json]

Builds the engine once (timing ``optimize``), then runs: batch-1 decode, TTFT of one 1024-token prompt on an idle
engine, and offline throughput of N requests of ISL/OSL 128/128; checks that CUDA-graph decode gives the eager
path's greedy tokens. Prints one table at the end; the targets are those of docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import yaml

from autodeploy import SamplingParams, optimize
from autodeploy.bench.decode_graph import decode_graph_profile, decode_replay_ms
from autodeploy.bench.engine_bench import run_engine_bench
from autodeploy.bench.hf_bench import run_hf_bench
from autodeploy.bench.workload import synthetic_requests
from autodeploy.models import ModelFactory
from host_steps import HostStepProfiler
from step_profile import StepProfiler


def hf_baselines(model_path: str, args) -> dict:
    factory = ModelFactory(model_path, dtype="bfloat16", device="cuda", random_weights=True)
    model = factory.build_model()
    vocab = factory.config.vocab_size
    out = {}
    r = run_hf_bench(model, synthetic_requests(1, 128, args.decode_osl // 4, vocab, seed=11), 1)
    out["hf_batch1_decode_tok_s"] = 1e3 / r.itl_p50_ms
    r = run_hf_bench(model, synthetic_requests(1, 1024, 1, vocab, seed=12), 1)
    out["hf_ttft_1024_ms"] = r.ttft_p50_ms
    r = run_hf_bench(model, synthetic_requests(64, 128, 128, vocab, seed=13), 64)
    out["hf_batch64_128_128_tok_s"] = r.output_tok_per_s
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def cuda_graph_tokens_match(engine, vocab: int) -> bool:
    prompts = [p.prompt_token_ids for p in synthetic_requests(8, 32, 1, vocab, seed=14)]
    engine.scheduler.block_manager.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    graphed = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    runner = engine.runner
    saved = runner.cuda_graphs, runner.prefill_graphs
    runner.cuda_graphs = runner.prefill_graphs = None
    engine.scheduler.block_manager.reset_prefix_cache()  # recompute the prompts exactly as the first time
    eager = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    runner.cuda_graphs, runner.prefill_graphs = saved
    return graphed == eager


def gpu_state() -> dict:
    """SM clock, power and the active clock-throttle reasons of GPU 0 (``nvidia-smi``) and the caching allocator's
    cudaMalloc/cudaFree counts, to tell a slow GPU or an allocator under pressure from slow code when a
    compute-bound figure moves between runs."""
    import subprocess

    fields = "clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    try:
        out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": repr(e)}
    state = dict(zip(fields.split(","), (v.strip() for v in out.split(","))))
    stats = torch.cuda.memory_stats()  # cudaMalloc calls and retries (a retry frees the cache and syncs)
    state.update({k: stats.get(k) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")})
    return state


def decode_kernels(engine) -> dict:
    """The batch-1 decode graph's kernel table (``decode_graph_profile``), printed as it is measured."""
    out = decode_graph_profile(engine.runner)
    print("decode kernels:", json.dumps(out), flush=True)
    return out


def ttft_kernels(engine, vocab: int, top: int = 20) -> list[dict]:
    """The GPU kernels (CPU ops without a GPU) of three 1024-token prefills under torch.profiler, by total time
    (ms per prefill)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run_engine_bench(engine, synthetic_requests(3, 1024, 1, vocab, seed=4), 1, name="ttft trace")
    rows = []
    for e in prof.key_averages():
        us = e.device_time_total if torch.cuda.is_available() else e.cpu_time_total
        if us > 0:
            rows.append({"kernel": e.key[:120], "calls": e.count // 3, "ms": round(us / 3e3, 3)})
    rows.sort(key=lambda r: -r["ms"])
    print("ttft kernels:", json.dumps(rows[:top]), flush=True)
    return rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="examples/configs/llama-3.1-8b/config.json")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-batch-size", type=int, default=1024)
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    parser.add_argument("--decode-osl", type=int, default=256)
    parser.add_argument("--attn-backend", default="auto")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile-steps", action="store_true", help="per-step GPU vs wall time of the offline run")
    parser.add_argument("--profile-ttft", action="store_true", help="GPU vs wall time of the TTFT prefill steps")
    parser.add_argument("--host-steps", action="store_true", help="per-step host time and GPU wait, no syncs added")
    parser.add_argument("--host-profile-from", type=int, default=None, help="with --host-steps: cProfile 10 steps")
    parser.add_argument("--trace-from", type=int, default=None, help="torch.profiler over 6 offline steps from here")
    parser.add_argument("--trace-ttft", action="store_true", help="torch.profiler: the TTFT steps' top kernels")
    parser.add_argument("--trace-decode", action="store_true", help="torch.profiler: the batch-1 decode graph")
    parser.add_argument("--only", default=None, help="comma list of: decode,ttft,offline (default all)")
    parser.add_argument("--offline-repeats", type=int, default=1, help="run the offline workload this many times")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict = {"device": device, "date": time.strftime("%Y-%m-%d")}
    if not args.skip_hf:
        results.update(hf_baselines(args.model, args))
        print("HF baselines:", results, flush=True)
    overrides = dict(item.split("=", 1) for item in args.set)
    start = time.perf_counter()
    engine = optimize(
        args.model, dtype="bfloat16", random_weights=True, max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens, max_seq_len=2048, attn_backend=args.attn_backend,
        **{k: yaml.safe_load(v) for k, v in overrides.items()},
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    results["optimize_s"] = time.perf_counter() - start
    results["kv_cache_blocks"] = engine.scheduler.config.num_blocks
    results["backend"] = engine.runner.spec.backend
    prefill_graphs = engine.runner.prefill_graphs
    results["prefill_graph_buckets"] = sorted(prefill_graphs.graphs) if prefill_graphs is not None else []
    print(f"optimize: {results['optimize_s']:.1f}s backend={results['backend']}", flush=True)
    vocab = engine.vocab_size
    if args.profile_steps:  # what the step runs: op counts of the cached graph
        from collections import Counter

        gm = getattr(engine.runner.gm, "_orig_mod", engine.runner.gm)
        ops = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        print("graph ops:", json.dumps(dict(ops.most_common())), flush=True)
    run_engine_bench(engine, synthetic_requests(8, 128, 16, vocab, seed=1), 0, name="warm-up")
    results["cuda_graph_tokens_match_eager"] = cuda_graph_tokens_match(engine, vocab)

    only = set((args.only or "decode,ttft,offline").split(","))
    if "decode" in only:
        r = run_engine_bench(engine, synthetic_requests(3, 128, args.decode_osl, vocab, seed=2), 1, name="batch-1 decode")
        results["batch1_decode_tok_s"] = 1e3 / r.itl_p50_ms
        results["batch1_itl_p99_ms"] = r.itl_p99_ms
        if torch.cuda.is_available():
            results["batch1_graph_replay_ms"] = decode_replay_ms(engine.runner)
            if args.trace_decode:
                results["decode_kernels"] = decode_kernels(engine)
    if "ttft" in only:
        results["gpu_before_ttft"] = gpu_state() if torch.cuda.is_available() else None
        profiler = StepProfiler(engine) if args.profile_steps or args.profile_ttft else None
        r = run_engine_bench(engine, synthetic_requests(5, 1024, 1, vocab, seed=3), 1, name="ttft 1024")
        results["ttft_1024_p50_ms"] = r.ttft_p50_ms
        if args.trace_ttft:
            results["ttft_kernels"] = ttft_kernels(engine, vocab)
        results["gpu_after_ttft"] = gpu_state() if torch.cuda.is_available() else None
        if profiler is not None:
            profiler.detach()
            results["ttft_steps"] = profiler.summary()
            print("ttft steps:", json.dumps(results["ttft_steps"]))
    if "offline" in only:
        results.update(offline(engine, args, vocab))
    print(json.dumps(results, indent=2))
    path = args.json or (os.path.join(os.environ["OUT"], "e2e.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def offline(engine, args, vocab: int) -> dict:
    """``--num-requests`` x 128/128, all submitted at once."""
    results: dict = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    profiler = None
    if args.profile_steps:
        profiler = StepProfiler(engine, trace_from=args.trace_from, python_profile_first=True)
    host_steps = HostStepProfiler(engine, args.host_profile_from) if args.host_steps else None
    results["gpu_before_offline"] = gpu_state() if torch.cuda.is_available() else None
    r = run_engine_bench(engine, synthetic_requests(args.num_requests, 128, 128, vocab, seed=4), 0, name="offline")
    if host_steps is not None:
        host_steps.detach()
        results["offline_host_steps"] = host_steps.summary()
        for row in results["offline_host_steps"]:
            print("host step:", json.dumps(row), flush=True)
        if host_steps.profile_text:
            print("host profile:\n" + host_steps.profile_text, flush=True)
    results["gpu_after_offline"] = gpu_state() if torch.cuda.is_available() else None
    if profiler is not None:
        profiler.detach()
        print("first offline step, host side:\n" + (profiler.first_step_profile or ""), flush=True)
        results["offline_steps"] = profiler.summary()
        if profiler.trace_table:
            print(profiler.trace_table)
            results["offline_trace"] = profiler.trace_table
        for row in results["offline_steps"]:
            print("{kind:8s} <={size<=:5d} steps={steps:4d} wall={wall_ms:7.2f}ms gpu={gpu_ms:7.2f}ms "
                  "dec={decodes:6.1f} ptok={prefill_tokens:7.1f} total={total_wall_s:6.2f}s".format(**row))
    results["offline_128_128_tok_s"] = r.output_tok_per_s
    if args.offline_repeats > 1:  # the same engine again: the spread between runs, without rebuilding
        runs = [r.output_tok_per_s]
        for i in range(1, args.offline_repeats):  # new prompts: nothing from the prefix cache
            requests = synthetic_requests(args.num_requests, 128, 128, vocab, seed=4 + 100 * i)
            runs.append(run_engine_bench(engine, requests, 0, name="offline").output_tok_per_s)
        results["offline_128_128_runs_tok_s"] = runs
        print("offline runs:", " ".join(f"{t:.0f}" for t in runs), flush=True)
    results["offline_requests_s"] = r.requests_per_s
    results["offline_ttft_p50_ms"] = r.ttft_p50_ms
    results["offline_itl_p50_ms"] = r.itl_p50_ms
    results["offline_itl_p99_ms"] = r.itl_p99_ms
    results["peak_memory_gib"] = r.peak_memory_gib
    return results

if __name__ == "__main__":
    main()
