"""Hugging Face ``generate`` with ``backend="autodeploy"`` vs eager vs ``backend="inductor"`` (Llama-3.1-8B shape).

    PYTHONPATH=$PWD python3 bench/compile_backend.py --out $OUT/compile_backend.json   # one H100, ~3-4 min
    python bench/compile_backend.py --smoke --out /tmp/compile_backend.json              # CPU, tiny Llama
    options: --configs eager,autodeploy,inductor,autodeploy_fx  --batches 1,16  --layers N  --mode MODE  --profile

The model is built from ``examples/configs/llama-3.1-8b/config.json`` with random bf16 weights directly on the GPU
(``--layers`` cuts the depth for a quick look). Every run is ``generate`` with Hugging Face's **static** KV cache
(``cache_implementation="static"``) and its own compile hook (``compile_config=CompileConfig(...)``): the prefill
runs eagerly and only the decode step is compiled, one graph per batch size (``dynamic=False``), which is how
Hugging Face compiles ``generate`` and keeps compile time to one graph per shape. Configurations:

- ``eager``: no compile (``disable_compile=True``);
- ``inductor``: ``backend="inductor"``, ``mode`` (default ``reduce-overhead``: CUDA graphs);
- ``autodeploy``: ``backend="autodeploy"``, ``options={"inductor": True, "mode": mode}``;
- ``autodeploy_fx``: ``backend="autodeploy"``, ``options={"inductor": False}`` — the transformed graph run as is
  (Triton fused ops, no CUDA graphs: Dynamo's ``cudagraphs`` backend refuses graphs that write the KV cache).

Per (configuration, batch): a ``PROMPT``-token prompt and ``NEW_TOKENS`` new tokens (forced with
``min_new_tokens``); the first call compiles (``first_call_s``), then ``REPEATS`` timed calls give ``tok_s``
(generated tokens / median wall time, prefill included). ``graphs`` is how many graphs Dynamo compiled for that
batch (recompiles), ``graph_breaks`` Dynamo's graph-break count, ``tokens_match_eager`` whether the greedy tokens
equal eager's (random bf16 weights give near-tied logits: a late divergence is rounding, not a bug; the CPU tests
check exact equality in float32). For ``autodeploy`` the backend's report adds its compile breakdown and matches.
One JSON line per measurement; ``--out`` gets all of them. ``--budget-s`` skips what would start after it.
Compile times are indicative: a configuration run later may find Triton kernels of an earlier one in the cache.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers import CompileConfig  # noqa: E402

import autodeploy  # noqa: E402,F401  (registers backend="autodeploy")
from autodeploy.compile_backend import reports  # noqa: E402
from results import JsonResults  # noqa: E402  (bench/, the script's folder)

CONFIGS = ("eager", "autodeploy", "inductor", "autodeploy_fx")  # run in this order (--budget-s cuts the tail)
MODEL = "examples/configs/llama-3.1-8b/config.json"
PROMPT, NEW_TOKENS, REPEATS = 32, 64, 2


def build_model(smoke: bool, layers: int | None) -> torch.nn.Module:
    if smoke:
        from autodeploy.models.tiny import tiny_model

        return tiny_model("llama")
    from autodeploy.models import ModelFactory

    factory = ModelFactory(MODEL, dtype="bfloat16", device="cuda", random_weights=True)
    if layers is not None:
        factory.config.num_hidden_layers = layers
    return factory.build_model()


def compile_config(name: str, mode: str | None) -> CompileConfig | None:
    if name == "eager":
        return None
    if name == "inductor":
        config = CompileConfig(backend="inductor", mode=mode, fullgraph=True, dynamic=False)
    else:  # torch.compile takes mode or options, not both: ours goes in the options
        options = {"inductor": name == "autodeploy", "mode": mode if name == "autodeploy" else None}
        config = CompileConfig(backend="autodeploy", mode=None, options=options, fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # Hugging Face compiles only on accelerators unless told (the CPU smoke)
    return config


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generate(model: torch.nn.Module, ids: torch.Tensor, config: CompileConfig | None) -> torch.Tensor:
    kwargs = {"compile_config": config} if config is not None else {"disable_compile": True}
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            cache_implementation="static",
            **kwargs,
        )
    sync()
    return out


def first_divergence(got: torch.Tensor, want: torch.Tensor) -> int | None:
    """Index of the first generated token where any row differs (None if all equal)."""
    differ = (got[:, PROMPT:] != want[:, PROMPT:]).any(0).nonzero()
    return int(differ[0]) if differ.numel() else None


def autodeploy_summary(new_reports: list) -> dict[str, Any]:
    if not new_reports:
        return {}
    return {
        "lowering_s": round(sum(r.lowering_s for r in new_reports), 2),
        "transforms_s": round(sum(r.transforms_s for r in new_reports), 2),
        "backend_compile_s": round(sum(r.backend_compile_s for r in new_reports), 2),
        "graph_backend": new_reports[-1].backend,
        "matches": new_reports[-1].matches,
        "autodeploy_ops": new_reports[-1].autodeploy_ops(),
        "fallback_calls": sum(r.fallback_calls for r in new_reports),
    }


def measure(
    model, name: str, batch: int, mode: str | None, eager_tokens: dict[int, torch.Tensor], profile: bool = False
) -> dict[str, Any]:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(100, vocab - 100, (batch, PROMPT), generator=gen).to(next(model.parameters()).device)
    config = compile_config(name, mode)
    graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    reports_before = len(reports())
    start = time.perf_counter()
    out = generate(model, ids, config)
    first_call_s = time.perf_counter() - start
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        generate(model, ids, config)
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    row: dict[str, Any] = {
        "config": name,
        "batch": batch,
        "mode": mode if name in ("inductor", "autodeploy") else None,
        "tok_s": round(batch * NEW_TOKENS / wall, 1),
        "ms_per_step": round(wall / NEW_TOKENS * 1e3, 2),
        "first_call_s": round(first_call_s, 1),
        "compile_s_est": round(first_call_s - wall, 1),
        "graphs": counters["stats"]["unique_graphs"] - graphs_before,
        "graph_breaks": sum(counters["graph_break"].values()) - breaks_before,
    }
    if name == "eager":
        eager_tokens[batch] = out
    elif batch in eager_tokens:
        divergence = first_divergence(out, eager_tokens[batch])
        row["tokens_match_eager"] = divergence is None
        row["first_divergence"] = divergence
    if name.startswith("autodeploy"):
        row.update(autodeploy_summary(reports()[reports_before:]))
    if profile:
        row.update(top_kernels(model, ids, config))
    return row


def top_kernels(model, ids: torch.Tensor, config, count: int = 12) -> dict[str, Any]:
    """One more ``generate`` under ``torch.profiler``: the GPU kernels that took the most time in it."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU  # CPU: the smoke
    with profile(activities=[activity]) as prof:
        generate(model, ids, config)
    rows = []
    for event in prof.key_averages():
        if activity == ProfilerActivity.CPU:
            us = event.self_cpu_time_total
        else:
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            rows.append((us, event.key, event.count))
    rows.sort(reverse=True)
    return {"gpu_ms_total": round(sum(r[0] for r in rows) / 1e3, 2),
            "top_kernels": [(name[:90], round(us / 1e3, 2), n) for us, name, n in rows[:count]]}


def reset(model: torch.nn.Module) -> None:
    """Forget every compiled graph (and Hugging Face's cached compiled call) between configurations."""
    torch._dynamo.reset()
    for attr in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    global PROMPT, NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, float32, short runs")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batches", default=None, help="comma list (default 1,16; smoke 1,2)")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to N layers (default: all 32)")
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of inductor/autodeploy")
    parser.add_argument("--budget-s", type=float, default=225.0, help="skip measurements that would start later")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="add each run's top GPU kernels (torch.profiler)")
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on CPU")
    if args.smoke:
        PROMPT, NEW_TOKENS = 8, 8
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,16")).split(",")]
    mode = None if args.mode in ("", "none", "default") else args.mode

    header = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "model": "tiny llama" if args.smoke else MODEL,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW_TOKENS,
        "cache": "static",
    }
    results = JsonResults(args.out, header)
    start = time.perf_counter()
    model = build_model(args.smoke, args.layers)
    sync()
    params = sum(p.numel() for p in model.parameters())
    results.add({"phase": "build", "s": round(time.perf_counter() - start, 1), "params_b": round(params / 1e9, 3),
                  "layers": model.config.num_hidden_layers, "dtype": str(next(model.parameters()).dtype)})
    eager_tokens: dict[int, torch.Tensor] = {}
    for name in configs:
        for batch in batches:
            if results.elapsed() > args.budget_s:
                results.add({"config": name, "batch": batch, "skipped": f"past --budget-s {args.budget_s}"})
                continue
            try:
                results.add(measure(model, name, batch, mode, eager_tokens, args.profile))
            except Exception as e:  # one failing configuration must not lose the others' numbers
                results.add({"config": name, "batch": batch, "error": f"{type(e).__name__}: {e}"[:2000]})
                traceback.print_exc()
        reset(model)


if __name__ == "__main__":
    main()
