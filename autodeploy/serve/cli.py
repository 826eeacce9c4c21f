"""``autodeploy serve``: build the engine once, then serve it over the OpenAI API until SIGTERM."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..cli import add_engine_args, engine_overrides

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(name, help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_engine_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=os.environ.get("AUTODEPLOY_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: $AUTODEPLOY_API_KEY, else none)")
    group.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the --model folder or file name)")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def model_name(model: str | None) -> str:
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.parent.name if path.name == "config.json" else path.stem if path.suffix == ".gguf" else path.name


def run(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console

    from ..api import optimize
    from .server import serve

    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status("Loading the model") as status:
        engine = optimize(args.model, progress=lambda message: status.update(message), **engine_overrides(args))
    name = args.served_model_name or model_name(args.model)
    console.print(f"[dim]'{name}' ready in {time.perf_counter() - start:.1f}s on {engine.device}; "
                  f"serving on http://{args.host}:{args.port}/v1[/dim]")
    logging.getLogger("autodeploy.serve").setLevel(args.log_level.upper())
    serve(engine, name, host=args.host, port=args.port, api_key=args.api_key,
          shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    return 0
