"""Tensor-parallel GPU benchmark: the same random-weight model at TP=1 and TP=2 in one invocation.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD python3 bench/tp.py --out tp.json      # 2 GPUs, Llama-3.1-8B shape, bf16
    PYTHONPATH=$PWD python3 bench/tp.py --smoke --out /tmp/tp.json             # CPU, gloo, tiny Llama

For each tensor-parallel size: build the engine (random weights from the same seed on every rank, built on the
rank's GPU; each rank keeps only its shard), greedy tokens of a few prompts (with the top-2 logprobs, so a
divergence can be told apart from a near-tie between two tokens), then batch-1 decode tokens/s (CUDA graphs,
ITL p50 over whole requests). Then: are TP=2's greedy tokens TP=1's, and the decode speed-up (target >= 1.6x).
TP=N runs once per ``--all-reduce`` setting (default ``auto,auto-unfused,nccl``: symmetric memory for small
messages with the all-reduce, residual add and RMSNorm in one kernel; the same in separate kernels; NCCL only),
so one invocation shows what each buys. ``--trace-decode`` adds the decode graph's kernel table (rank 0's).
Prints one JSON line per measurement and rewrites ``--out`` after each, so a run cut short keeps what it measured.
NVLink multicast (NVLS) stays off: ``NCCL_NVLS_ENABLE=0`` is set here unless the caller set it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import subprocess
import tempfile
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before torch.distributed starts; spawned ranks inherit it

import torch  # noqa: E402

from autodeploy import SamplingParams, optimize  # noqa: E402
from autodeploy.bench.decode_graph import decode_graph_profile, decode_replay_ms  # noqa: E402
from autodeploy.bench.engine_bench import run_engine_bench  # noqa: E402
from autodeploy.bench.workload import synthetic_requests  # noqa: E402
from autodeploy.distributed.symm_all_reduce import symm_all_reduce_bytes  # noqa: E402

GPU_MODEL = "examples/configs/llama-3.1-8b/config.json"
TARGET_SPEEDUP = 1.6
NEAR_TIE = 0.05  # TP=1's top-2 logprob gap under which a TP=2 divergence is rounding order, not a sharding bug
CHILD_SHUTDOWN_S = 30.0  # after its measurements, how long a child run may take to shut down


class Results:
    """Measurements as JSON lines on stdout and, all of them, in ``path`` (rewritten after each)."""

    def __init__(self, path: str, header: dict):
        self.path, self.rows = path, [header]
        self.add(header, keep=False)

    def add(self, row: dict, keep: bool = True) -> None:
        if keep:
            self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.path, "w") as f:
            json.dump(self.rows, f, indent=2)


def smoke_model_path() -> str:
    """A tiny Llama ``config.json`` (4 query heads, 2 KV heads) in a temporary folder."""
    from autodeploy.models.tiny import tiny_config

    folder = tempfile.mkdtemp(prefix="autodeploy-tp-smoke-")
    tiny_config("llama").to_json_file(os.path.join(folder, "config.json"))
    return os.path.join(folder, "config.json")


def engine_settings(args: argparse.Namespace, cuda: bool) -> dict:
    settings = {
        "dtype": args.dtype or ("bfloat16" if cuda else "float32"),
        "random_weights": True,
        "seed": 0,
        "max_batch_size": 4,
        "max_num_tokens": 2048,
        "max_seq_len": 2048,
        "kv_cache.max_tokens": 32768,
        "cuda_graphs": cuda and not args.eager,
    }
    if args.layers is not None:
        settings["num_hidden_layers"] = args.layers
    return settings


def greedy_run(engine, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Per prompt: the greedy tokens and, per step, the gap between the best and second-best logprob."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    out = []
    for result in engine.generate(prompts, params):
        completion = result.outputs[0]
        gaps = []
        for step in completion.logprobs or []:
            top = sorted((lp.logprob for lp in step.values()), reverse=True)
            gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
        out.append({"tokens": completion.token_ids, "top2_gaps": gaps})
    return out


def compare_greedy(reference: list[dict], candidate: list[dict]) -> dict:
    """Exact equality, and where a prompt diverges: the step and TP=1's top-2 logprob gap there (a near-tie
    is bf16 rounding order, not a sharding bug)."""
    prompts = []
    for ref, cand in zip(reference, candidate):
        same = 0
        while same < min(len(ref["tokens"]), len(cand["tokens"])) and ref["tokens"][same] == cand["tokens"][same]:
            same += 1
        row = {"matched_tokens": same, "of": len(ref["tokens"])}
        if same < len(ref["tokens"]):
            gap = ref["top2_gaps"][same] if same < len(ref["top2_gaps"]) else None
            row["tp1_top2_gap_at_divergence"] = gap
            row["near_tie"] = gap is not None and gap < NEAR_TIE
        prompts.append(row)
    return {
        "equal": all(p["matched_tokens"] == p["of"] for p in prompts),
        "equal_up_to_near_ties": all(p["matched_tokens"] == p["of"] or p["near_tie"] for p in prompts),
        "prompts": prompts,
    }


def config_with(model: str, overrides: dict) -> str:
    """A copy of ``model`` (a config.json) with some keys changed (fewer layers: a quicker run of the same shape;
    a larger ``initializer_range``: random logits spread far enough that greedy tokens have no exact ties)."""
    with open(model) as f:
        raw = json.load(f)
    raw.update(overrides)
    folder = tempfile.mkdtemp(prefix="autodeploy-tp-config-")
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        json.dump(raw, f)
    return path


def on_every_rank(engine, fn):
    """``fn(runner)`` on every rank at once (a CUDA graph with collectives needs them all); rank 0's result."""
    runner = engine.runner
    return runner.call_on_all_ranks(fn)[0] if hasattr(runner, "call_on_all_ranks") else fn(runner)


def run_tp(
    model: str, tp: int, args: argparse.Namespace, cuda: bool, results: Results, baseline: dict | None = None,
    all_reduce: str = "auto",
) -> dict:
    """Build, measure and shut down one engine. With ``baseline`` (TP=1's result) the comparison rows are written
    before the shutdown, so a rank that is slow to stop cannot lose them. ``all_reduce``: ``auto``, ``nccl``, or
    ``auto-unfused`` (``auto`` without ``fuse_all_reduce_rmsnorm``)."""
    label = all_reduce
    settings = engine_settings(args, cuda)
    all_reduce, _, variant = all_reduce.partition("-")
    if variant == "unfused":  # the all-reduce, the residual add and the RMSNorm as separate kernels
        settings["transforms.fuse_all_reduce_rmsnorm.enabled"] = False
    overrides = {key: value for key, value in (("num_hidden_layers", settings.pop("num_hidden_layers", None)),
                                               ("initializer_range", args.initializer_range)) if value is not None}
    if overrides:
        model = config_with(model, overrides)
    start = time.perf_counter()
    engine = optimize(model, tensor_parallel_size=tp, all_reduce=all_reduce, **settings)
    build_s = time.perf_counter() - start
    results.add({"measure": "build", "tp": tp, "all_reduce": label, "seconds": round(build_s, 1),
                 "kv_cache_blocks": engine.scheduler.config.num_blocks,
                 "symm_all_reduce_bytes": symm_all_reduce_bytes()})
    try:
        vocab = engine.vocab_size
        prompts = [list(torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(7 + i)).tolist())
                   for i, n in enumerate(args.prompt_lens)]
        greedy = greedy_run(engine, prompts, args.greedy_tokens)
        results.add({"measure": "greedy", "tp": tp, "tokens": [g["tokens"] for g in greedy],
                     "min_top2_gap": min(min(g["top2_gaps"]) for g in greedy)})
        run_engine_bench(engine, synthetic_requests(2, 64, 8, vocab, seed=1), 1, name=f"warm-up tp={tp}")
        requests = synthetic_requests(args.decode_requests, 128, args.decode_tokens, vocab, seed=2)
        report = run_engine_bench(engine, requests, 1, name=f"batch-1 decode tp={tp}")
        decode = {"measure": "decode_batch1", "tp": tp, "all_reduce": label,
                  "tok_s": round(1e3 / report.itl_p50_ms, 1), "itl_p50_ms": round(report.itl_p50_ms, 3),
                  "itl_p99_ms": round(report.itl_p99_ms, 3)}
        if cuda and not args.eager:
            decode["graph_replay_ms"] = round(on_every_rank(engine, decode_replay_ms), 3)
        results.add(decode)
        if cuda and args.trace_decode and not args.eager:
            results.add({"measure": "decode_kernels", "tp": tp, "all_reduce": label,
                         **on_every_rank(engine, decode_graph_profile)})
        measured = {"greedy": greedy, "tok_s": decode["tok_s"]}
        if args.child:  # for the parent, before the shutdown that may hang
            results.add({"measure": "measured", "tp": tp, "all_reduce": label, **measured})
        if baseline is not None:
            add_comparison(results, args.tp, baseline, measured, label)
        return measured
    finally:
        stop_start = time.perf_counter()
        engine.shutdown()
        results.add({"measure": "shutdown", "tp": tp, "seconds": round(time.perf_counter() - stop_start, 1)})
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny Llama: checks the script runs")
    parser.add_argument("--out", required=True, help="JSON file for all results")
    parser.add_argument("--model", default=None, help=f"config.json or checkpoint (default {GPU_MODEL})")
    parser.add_argument("--tp", type=int, default=2, help="the tensor-parallel size compared with TP=1")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: the model's)")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=None)
    parser.add_argument("--greedy-tokens", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--decode-requests", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (to isolate a capture problem)")
    parser.add_argument("--initializer-range", type=float, default=None,
                        help="std of the random weights (the config's 0.02 gives exact top-2 ties in bf16; try 0.2)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "tp:all_reduce": one run (internal)
    parser.add_argument("--isolate", action="store_true", help="each run in a child process (always on CUDA)")
    parser.add_argument("--child-timeout", type=float, default=240.0, help="seconds for one run in its child process")
    parser.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on CUDA; float32 makes the "
                        "greedy comparison decidable: no bf16 near-ties)")
    parser.add_argument("--all-reduce", default="auto,auto-unfused,nccl",
                        help="all_reduce settings to run TP=N with, in order (auto: symmetric memory for small "
                        "messages, fused with the add + RMSNorm after it; auto-unfused: the same, in separate kernels)")
    parser.add_argument("--trace-decode", action="store_true",
                        help="torch.profiler: the batch-1 decode graph's kernels")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not args.smoke and not cuda:
        sys.exit("bench/tp.py needs CUDA GPUs (or --smoke for the CPU check)")
    if cuda and torch.cuda.device_count() < args.tp:
        sys.exit(f"--tp {args.tp} needs {args.tp} GPUs, {torch.cuda.device_count()} are visible")
    model = args.model or (smoke_model_path() if args.smoke else GPU_MODEL)
    args.prompt_lens = args.prompt_lens or ([5, 17, 40] if args.smoke else [16, 100, 300, 700])
    args.greedy_tokens = args.greedy_tokens or (8 if args.smoke else 32)
    args.decode_tokens = args.decode_tokens or (12 if args.smoke else 128)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    results = Results(args.out, {"bench": "tp", "device": device, "gpus": torch.cuda.device_count() if cuda else 0,
                                 "model": model, "tp": args.tp, "layers": args.layers,
                                 "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
                                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")})
    start = time.perf_counter()
    if args.child:
        tp, all_reduce = args.child.split(":")
        run_tp(model, int(tp), args, cuda, results, all_reduce=all_reduce)
        return
    isolate = cuda or args.isolate
    if isolate:
        def run(tp, all_reduce, base):
            return run_isolated_with(results, tp, all_reduce, args.child_timeout)
    else:
        def run(tp, all_reduce, base):
            return run_tp(model, tp, args, cuda, results, base, all_reduce)
    base = run(1, "auto", None)
    for all_reduce in args.all_reduce.split(","):
        sharded = run(args.tp, all_reduce, base)
        if isolate and base and sharded:
            add_comparison(results, args.tp, base, sharded, all_reduce)
    results.add({"measure": "done", "total_s": round(time.perf_counter() - start, 1)})


def child_command(config: str, out: str) -> list[str]:
    """This script's command line for one (tp, all_reduce) run in a child process."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--out", "--all-reduce"):
            skip = True
        elif not arg.startswith(("--out=", "--all-reduce=")):
            argv.append(arg)
    return [sys.executable, os.path.abspath(__file__), *argv, "--out", out, "--child", config]


def run_isolated_with(results: Results, tp: int, all_reduce: str, timeout_s: float) -> dict | None:
    """One run in a child process, so a rank that hangs at shutdown cannot stall the others: once the child has
    written its measurements it gets ``CHILD_SHUTDOWN_S`` to exit, then it is killed (and that is reported)."""
    fd, path = tempfile.mkstemp(prefix="autodeploy-tp-", suffix=".json")
    os.close(fd)
    proc = subprocess.Popen(child_command(f"{tp}:{all_reduce}", path))
    deadline, measured = time.monotonic() + timeout_s, None
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1.0)
        if measured is None:
            measured = read_measured(path)
            if measured is not None:
                deadline = min(deadline, time.monotonic() + CHILD_SHUTDOWN_S)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        results.add({"measure": "child_killed", "tp": tp, "all_reduce": all_reduce,
                     "after_measuring": measured is not None})
    for row in read_rows(path)[1:]:
        if row.get("measure") != "measured":
            results.add(row)
    return measured if measured is not None else read_measured(path)


def read_rows(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def read_measured(path: str) -> dict | None:
    return next((row for row in read_rows(path) if row.get("measure") == "measured"), None)


def add_comparison(results: Results, tp: int, base: dict, sharded: dict, all_reduce: str) -> None:
    results.add({"measure": "greedy_equal", "tp": tp, "all_reduce": all_reduce,
                 **compare_greedy(base["greedy"], sharded["greedy"])})
    speedup = sharded["tok_s"] / base["tok_s"]
    results.add({"measure": "decode_speedup", "tp": tp, "all_reduce": all_reduce, "speedup": round(speedup, 3),
                 "target": TARGET_SPEEDUP, "meets_target": speedup >= TARGET_SPEEDUP})


if __name__ == "__main__":
    main()
