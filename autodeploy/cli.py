"""``autodeploy run | serve | bench | inspect | coverage``.

Engine options are shared: ``--model``, ``--dtype``, ``--device``, ``--max-batch-size``, ``--max-num-tokens``,
``--max-seq-len``, ``--attn-backend``, ``--random-weights`` and any config key through ``--set key=value``
(dotted paths into configs/default.yaml, e.g. ``--set transforms.match_rope.enabled=false``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .config import parse_cli_value


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="checkpoint folder, .gguf, config.json (default: embedded SmolLM2)")
    group.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
    group.add_argument("--max-batch-size", type=int, default=None)
    group.add_argument("--max-num-tokens", type=int, default=None)
    group.add_argument("--max-seq-len", type=int, default=None)
    group.add_argument("--attn-backend", default=None, choices=["auto", "torch", "triton", "flashinfer"])
    group.add_argument("--random-weights", action="store_true", help="random weights in the model's shapes")
    group.add_argument("--no-cuda-graphs", action="store_true")
    group.add_argument("--tensor-parallel-size", "--tp", type=int, default=None)
    group.add_argument("--quantize", default=None, choices=["fp8", "int8_weight_only", "int4_weight_only"])
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (dotted)")
    group.add_argument("-v", "--verbose", action="store_true", help="log every transform")


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key in ("dtype", "device", "max_batch_size", "max_num_tokens", "max_seq_len", "attn_backend",
                "tensor_parallel_size", "quantize"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "random_weights", False):
        overrides["random_weights"] = True
    if getattr(args, "no_cuda_graphs", False):
        overrides["cuda_graphs"] = False
    for item in getattr(args, "set", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_cli_value(value)
    return overrides


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from .commands import COMMANDS

    parser = argparse.ArgumentParser(prog="autodeploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_parser(sub, name)
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    from .errors import AutoDeployError

    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except AutoDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
