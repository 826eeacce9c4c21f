"""``autodeploy inspect``: every transform's matches, node counts and time; ``--verify`` checks each numerically."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ..cli import add_engine_args, engine_overrides
from ..config import build_config


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(name, help="show what each transform does to a model's graph")
    add_engine_args(parser)
    parser.add_argument("--verify", action="store_true", help="run the graph after every transform and compare")
    parser.add_argument("--graph", action="store_true", help="print the final graph")


def run(args: argparse.Namespace) -> int:
    from ..errors import VerificationError
    from ..inspection import history_rows, inspect_model

    overrides = {"device": "cpu", "dtype": "float32", **engine_overrides(args)}
    config = build_config(overrides)
    console = Console()
    failure: VerificationError | None = None
    try:
        gm, results = inspect_model(args.model, config, verify=args.verify)
    except VerificationError as e:
        failure = e
        gm, results = e.gm, e.results
    verified = {r.name: r for r in results}
    table = Table(title=f"autodeploy inspect: {args.model or 'SmolLM2-135M-Instruct (embedded)'}")
    for column in ("transform", "stage", "matches", "nodes", "time (s)", *(["max |Δ logits|"] if args.verify else [])):
        table.add_column(column, justify="left" if column in ("transform", "stage") else "right")
    for row in history_rows(gm):
        cells = [
            row["name"],
            row["stage"],
            "skipped" if row["skipped"] else str(row["num_matches"]),
            f"{row['nodes_before']} -> {row['nodes_after']}",
            f"{row['time_s']:.3f}",
        ]
        if args.verify:
            result = verified.get(row["name"])
            cells.append("-" if result is None else f"{result.max_abs_err:.2e}{'' if result.ok else '  FAIL'}")
        table.add_row(*cells)
    console.print(table)
    if args.graph:
        console.print(str(gm.graph))
    if failure is not None:
        console.print(f"[red]verification failed:[/red] {failure}")
        return 1
    if args.verify:
        console.print(f"[green]verified {len(results)} transforms: outputs unchanged within tolerance[/green]")
    return 0
