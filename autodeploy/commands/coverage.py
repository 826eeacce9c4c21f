"""``autodeploy coverage``: every causal-LM architecture of transformers through the pipeline -> docs/COVERAGE.md.

Each model type runs in its own subprocess with a timeout (``autodeploy/coverage.py``); the table is written when
all are done. ``--only llama,gpt2`` runs a few (and prints their rows) without touching the file unless ``--output``
is given. ``--json FILE`` appends each result as it arrives; ``--rerun-failed FILE`` keeps the settled rows of
an earlier ``--json`` file (pass, unsupported, not decoder-only text) and runs only the rest again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUTPUT = Path("docs/COVERAGE.md")


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(name, help="run every causal-LM architecture in transformers and write docs/COVERAGE.md")
    parser.add_argument("--only", default=None, help="comma-separated model types (default: the whole mapping)")
    parser.add_argument("--output", type=Path, default=None, help=f"markdown file (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per architecture")
    parser.add_argument("--jobs", type=int, default=2, help="architectures run at the same time")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON lines")
    parser.add_argument(
        "--rerun-failed",
        type=Path,
        default=None,
        metavar="JSONL",
        help="reuse the settled results of an earlier --json file and run only the failed, mismatched or timed-out",
    )
    parser.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from ..coverage import PASS, REQUIRED, all_model_types, load_results, render_markdown, run_coverage, settled

    model_types = args.only.split(",") if args.only else all_model_types()
    kept = {}
    if args.rerun_failed is not None:
        kept = {r.model_type: r for r in load_results(args.rerun_failed) if settled(r) and r.model_type in model_types}
    if args.json is not None:
        args.json.write_text("".join(json.dumps(asdict(r)) + "\n" for r in kept.values()))

    def show(result) -> None:
        ops = ", ".join(f"{k.removeprefix('torch_')}×{v}" for k, v in result.ops.items())
        print(f"{result.model_type:26s} {result.status:22s} {result.time_s:6.1f}s  {ops}  {result.reason}", flush=True)
        if args.json is not None:
            with args.json.open("a") as f:
                f.write(json.dumps(asdict(result)) + "\n")

    todo = [m for m in model_types if m not in kept]
    fresh = {r.model_type: r for r in run_coverage(todo, timeout_s=args.timeout, jobs=args.jobs, on_result=show)}
    results = [kept.get(m) or fresh[m] for m in model_types]
    output = args.output if args.output is not None else (None if args.only else DEFAULT_OUTPUT)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render_markdown(results))
        print(f"wrote {output}")
    failed = [r.model_type for r in results if r.model_type in REQUIRED and r.status != PASS]
    if failed:
        print(f"required architectures not passing: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
