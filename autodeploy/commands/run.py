"""``autodeploy run``: load, export and transform a model (with progress), generate, print text and tokens/s."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from ..cli import add_engine_args, engine_overrides


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(name, help="generate text from a prompt (default model: embedded SmolLM2-135M-Instruct)")
    add_engine_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")


def run(args: argparse.Namespace) -> int:
    from ..api import LLM
    from ..executor.sampling_params import SamplingParams

    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status("Loading the model") as status:
        llm = LLM(args.model, progress=lambda message: status.update(message), **engine_overrides(args))
    console.print(f"[dim]ready in {time.perf_counter() - start:.1f}s on {llm.engine.device}[/dim]")
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens
    )
    prompts = args.prompt
    if args.chat:
        prompts = [llm.engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    for prompt, output in zip(args.prompt, outputs):
        print(f"{prompt}{output.outputs[0].text}" if not args.chat else output.outputs[0].text)
        print()
    console.print(f"[dim]{num_tokens} tokens in {elapsed:.2f}s: {num_tokens / elapsed:.1f} tokens/s[/dim]")
    return 0
