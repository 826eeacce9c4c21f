"""``autodeploy bench`` (trtllm-bench style): synthetic requests through the engine, optionally vs HF generate."""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from ..cli import add_engine_args, engine_overrides
from .metrics import BenchReport
from .workload import synthetic_requests

#: most sequences per step when ``--max-batch-size`` is not given: every request in flight, up to this many
BENCH_MAX_BATCH = 1024


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(name, help="benchmark the engine on synthetic requests",
                            description="Without --max-batch-size, the engine takes every request in flight (the "
                            f"concurrency, else all requests) up to {BENCH_MAX_BATCH} sequences a step.")
    add_engine_args(parser)
    parser.add_argument("--isl", type=int, default=128, help="input tokens per request")
    parser.add_argument("--osl", type=int, default=128, help="output tokens per request")
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=0, help="requests in flight (0 = all at once)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=4, help="warm-up requests before timing")
    parser.add_argument("--baseline", choices=["hf"], default=None, help="also time HF generate on the same model")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="HF baseline batch (default: concurrency)")
    parser.add_argument("--hf-num-requests", type=int, default=None, help="HF baseline requests (default: 2 batches)")
    parser.add_argument("--json", default=None, help="write the report to this file ('-' for stdout)")


def bench_batch_size(concurrency: int, num_requests: int) -> int:
    """The engine's ``max_batch_size`` for a throughput run: what can be in flight at once, at most
    ``BENCH_MAX_BATCH`` (as trtllm-bench sizes its engine from the workload, not from a serving default)."""
    return max(1, min(concurrency or num_requests, BENCH_MAX_BATCH))


def _hf_model(args: argparse.Namespace, config):
    from ..models import ModelFactory

    factory = ModelFactory(args.model, dtype=config.dtype, device=config.device, random_weights=config.random_weights,
                           load_eagerly=True)
    return factory.build_model(), factory.config.get_text_config().vocab_size


def run(args: argparse.Namespace) -> int:
    from ..api import optimize
    from ..config import build_config
    from .engine_bench import run_engine_bench
    from .hf_bench import run_hf_bench

    console = Console(stderr=True)
    overrides = engine_overrides(args)
    overrides.setdefault("max_batch_size", bench_batch_size(args.concurrency, args.num_requests))
    config = build_config(overrides)
    reports: list[BenchReport] = []
    if args.baseline == "hf":  # first, so its memory is free again before the engine sizes its KV cache
        model, vocab = _hf_model(args, config)
        batch = args.hf_batch_size or (args.concurrency or min(64, args.num_requests))
        count = args.hf_num_requests or min(args.num_requests, 2 * batch)
        reports.append(run_hf_bench(model, synthetic_requests(count, args.isl, args.osl, vocab, seed=1), batch))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    start = time.perf_counter()
    with console.status("Building the engine") as status:
        engine = optimize(args.model, config=config, progress=lambda m: status.update(m))
    build_s = time.perf_counter() - start
    vocab = engine.vocab_size
    if args.warmup:
        run_engine_bench(engine, synthetic_requests(args.warmup, args.isl, min(args.osl, 8), vocab, seed=2), 0,
                         name="warm-up")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    requests = synthetic_requests(args.num_requests, args.isl, args.osl, vocab)
    report = run_engine_bench(engine, requests, args.concurrency, args.temperature)
    report.extra["build_s"] = build_s
    report.extra["max_batch_size"] = config.max_batch_size
    reports.insert(0, report)
    _print(console, args, reports)
    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "reports": [r.as_dict() for r in reports],
        }
        text = json.dumps(payload, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


def _print(console: Console, args: argparse.Namespace, reports: list[BenchReport]) -> None:
    table = Table(title=f"isl={args.isl} osl={args.osl} requests={args.num_requests} concurrency={args.concurrency or 'all'}")
    for column in ("engine", "output tok/s", "req/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "peak GiB"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for r in reports:
        table.add_row(
            r.name,
            f"{r.output_tok_per_s:,.1f}",
            f"{r.requests_per_s:.2f}",
            f"{r.ttft_p50_ms:.1f} / {r.ttft_p99_ms:.1f}",
            f"{r.itl_p50_ms:.2f} / {r.itl_p99_ms:.2f}",
            "-" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}",
        )
    Console().print(table)
    if len(reports) > 1:
        console.print(f"speed-up vs {reports[1].name}: {reports[0].output_tok_per_s / reports[1].output_tok_per_s:.1f}x")
    console.print(f"engine build (export, transforms, cache, CUDA graphs): {reports[0].extra['build_s']:.1f}s")
