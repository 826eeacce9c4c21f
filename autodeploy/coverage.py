"""Architecture coverage: every model type of transformers' causal-LM mapping through the whole pipeline.

``check_architecture("llama")`` builds the tiny random model of ``models/tiny.py`` (float32, CPU), runs the
pipeline stage by stage (factory, export, pattern matching, the rest), generates greedily for prompts of
several lengths batched together, and compares the tokens with Hugging Face's own ``generate`` for each
prompt alone. The result says how far it got, which canonical ops the graph holds after pattern matching, and
why it failed where it did.

``run_coverage`` runs every architecture in its own subprocess with a timeout (one crash or hang does not stop
the table) and ``render_markdown`` writes ``docs/COVERAGE.md``. ``autodeploy coverage`` and
``scripts/coverage.py`` are the entry points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

#: statuses, in the order the table lists them
PASS, MISMATCH, FAIL, UNSUPPORTED, NOT_DECODER, TIMEOUT = (
    "pass",
    "mismatch",
    "fail",
    "unsupported",
    "not decoder-only text",
    "timeout",
)

#: the architectures the project promises (issue 4); the CI subset is drawn from these
REQUIRED = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "cohere", "granite",
    "olmo2", "starcoder2", "stablelm", "gpt_neox", "gptj", "falcon", "bloom", "mpt", "gpt2", "gpt_bigcode", "opt",
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4_text",
)  # fmt: skip
PROMPT_LENGTHS = (3, 17, 41)
MAX_NEW_TOKENS = 16
RESULT_PREFIX = "AUTODEPLOY_COVERAGE_RESULT "


@dataclass
class CoverageResult:
    model_type: str
    status: str
    stage: str = ""  # the stage reached (or that failed): factory, export, pattern_matcher, pipeline, generate
    exported: bool | None = None
    ops: dict[str, int] = field(default_factory=dict)
    greedy: str = ""  # "3/3": prompts whose greedy tokens equal HF's
    time_s: float = 0.0
    reason: str = ""
    model_class: str = ""


def all_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    what = getattr(exc, "what", None)
    if what:
        where = getattr(exc, "where", None)
        return f"{type(exc).__name__}: {what}" + (f" (at {where})" if where else "")
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:400]


def _canonical_op_counts(gm: Any) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("autodeploy."):
            counts[str(node.target).split(".")[1]] += 1
    return dict(sorted(counts.items()))


def check_architecture(
    model_type: str, lengths: Sequence[int] = PROMPT_LENGTHS, max_new_tokens: int = MAX_NEW_TOKENS
) -> CoverageResult:
    """Run one architecture through the pipeline and the engine; never raises."""
    import torch

    from .config import build_config
    from .errors import NotDecoderOnlyTextError, UnsupportedArchitectureError
    from .executor.engine import Engine
    from .executor.sampling_params import SamplingParams
    from .export import export_causal_lm
    from .models import ModelFactory
    from .models.tiny import tiny_model
    from .transforms import SharedContext, Stage
    from .transforms.pipeline import build_transforms, run_transforms

    result = CoverageResult(model_type, FAIL, stage="factory")
    start = time.perf_counter()
    try:
        _classify(model_type)
        model = _build_tiny(model_type, tiny_model)
        result.model_class = type(model).__name__
        config = build_config(
            {"max_batch_size": 8, "max_seq_len": 128, "max_num_tokens": 256, "kv_cache.block_size": 4}
        )
        factory = ModelFactory(model, dtype="float32", device="cpu")
        ctx = SharedContext(device=factory.device, dtype=factory.dtype, factory=factory)
        module = factory.build_model()
        result.stage = "export"
        gm = export_causal_lm(module, config.export, max_batch=config.max_batch_size, max_seq_len=config.max_seq_len)
        result.exported = True
        transforms = build_transforms(config)
        early = [s for s in Stage if s.order <= Stage.PATTERN_MATCHER.order]
        result.stage = "pattern_matcher"
        gm = run_transforms(gm, transforms, ctx, stages=early)
        result.ops = _canonical_op_counts(gm)
        result.stage = "pipeline"
        gm = run_transforms(gm, transforms, ctx, stages=[s for s in Stage if s not in early])
        engine = Engine(gm, ctx, config, factory)
        result.stage = "generate"
        vocab = model.config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = engine.generate(prompts, params)
        equal = 0
        first_diff = ""
        for prompt, output in zip(prompts, outputs):
            with torch.no_grad():
                ref = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
            expected = ref[0, len(prompt) :].tolist()
            got = list(output.outputs[0].token_ids)
            if got == expected:
                equal += 1
            elif not first_diff:
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                first_diff = f"prompt of {len(prompt)} tokens differs from HF at generated token {at}"
        result.greedy = f"{equal}/{len(prompts)}"
        result.status = PASS if equal == len(prompts) else MISMATCH
        result.reason = first_diff
        result.stage = "done"
    except NotDecoderOnlyTextError as e:
        result.status, result.reason = NOT_DECODER, e.what
    except UnsupportedArchitectureError as e:
        result.status, result.reason = UNSUPPORTED, _first_line(e)
    except Exception as e:  # noqa: BLE001  (the table records every failure)
        result.status, result.reason = FAIL, _first_line(e)
        if os.environ.get("AUTODEPLOY_COVERAGE_TRACEBACK"):
            traceback.print_exc()
    result.time_s = round(time.perf_counter() - start, 1)
    return result


def _classify(model_type: str) -> None:
    """Refuse what is not a decoder-only text transformer, from transformers' default config (before shrinking)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .errors import ModelLoadError
    from .models.architecture import check_config, check_decoder_only_text

    config_cls = CONFIG_MAPPING[model_type]
    check_decoder_only_text(config_cls)
    try:
        default = config_cls()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"transformers cannot build the default {config_cls.__name__}: {_first_line(e)}") from e
    try:
        model_cls = AutoModelForCausalLM._model_mapping[config_cls]
    except (KeyError, ValueError):
        model_cls = None
    check_config(default, model_cls)


def _build_tiny(model_type: str, tiny_model: Callable[[str], Any]) -> Any:
    """The tiny model; when it cannot be built, say whether transformers builds the *default* config either."""
    try:
        return tiny_model(model_type)
    except Exception as e:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from .errors import ModelLoadError

        try:
            with torch.device("meta"):
                AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type]())
        except Exception as default_error:  # noqa: BLE001
            raise ModelLoadError(
                f"transformers cannot build this model even from its default config (a transformers bug, not a "
                f"tiny-config one): {_first_line(default_error)}"
            ) from e
        raise


# ----------------------------------------------------------------------------------------------- subprocesses


def _run_in_subprocess(model_type: str, timeout_s: float) -> CoverageResult:
    cmd = [sys.executable, "-m", "autodeploy.coverage", model_type]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where ``import autodeploy`` resolves
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = path
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return CoverageResult(model_type, TIMEOUT, time_s=round(timeout_s, 1), reason=f"no result in {timeout_s:.0f}s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return CoverageResult(**json.loads(line[len(RESULT_PREFIX) :]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return CoverageResult(
        model_type, FAIL, time_s=round(time.perf_counter() - start, 1), reason=f"crashed (exit {proc.returncode}): {tail}"
    )


def refused_from_config(model_type: str) -> CoverageResult | None:
    """The result of ``check_architecture`` when ``_classify`` refuses ``model_type``; ``None`` when it passes or
    fails for another reason (left to the subprocess, which records it)."""
    from transformers import AutoModelForCausalLM  # noqa: F401  (the import is not the check's time)

    from .errors import NotDecoderOnlyTextError, UnsupportedArchitectureError

    start = time.perf_counter()
    try:
        _classify(model_type)
    except NotDecoderOnlyTextError as e:
        return CoverageResult(model_type, NOT_DECODER, "factory", time_s=round(time.perf_counter() - start, 1), reason=e.what)
    except UnsupportedArchitectureError as e:
        reason = _first_line(e)
        return CoverageResult(model_type, UNSUPPORTED, "factory", time_s=round(time.perf_counter() - start, 1), reason=reason)
    except Exception:  # noqa: BLE001
        return None
    return None


def run_coverage(
    model_types: Iterable[str],
    timeout_s: float = 300.0,
    jobs: int = 1,
    on_result: Callable[[CoverageResult], None] | None = None,
) -> list[CoverageResult]:
    """Every architecture in a subprocess of its own, ``jobs`` at a time; results in the given order.

    Model types refused from their config alone (not decoder-only text, or a part autodeploy lacks) are settled
    in this process first: that check builds no model, so it needs no subprocess of its own.
    """
    model_types = list(model_types)

    def one(model_type: str) -> CoverageResult:
        result = refused_from_config(model_type) or _run_in_subprocess(model_type, timeout_s)
        if on_result is not None:
            on_result(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, model_types))


def settled(result: CoverageResult) -> bool:
    """A result that a rerun would not change unless the code did: passed, or refused on purpose."""
    return result.status in (PASS, UNSUPPORTED, NOT_DECODER)


def load_results(path: str | os.PathLike) -> list[CoverageResult]:
    """Results from a JSON-lines file written by ``autodeploy coverage --json``; the last line per model type wins."""
    by_type: dict[str, CoverageResult] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                result = CoverageResult(**json.loads(line))
                by_type[result.model_type] = result
    return list(by_type.values())


# ----------------------------------------------------------------------------------------------- the table

_ORDER = {PASS: 0, MISMATCH: 1, FAIL: 2, TIMEOUT: 3, UNSUPPORTED: 4, NOT_DECODER: 5}


def _ops_cell(ops: dict[str, int]) -> str:
    short = {name.removeprefix("torch_"): n for name, n in ops.items()}
    return ", ".join(f"{name}×{n}" for name, n in short.items()) or "–"


def _row(r: CoverageResult) -> str:
    exported = {True: "yes", False: "no", None: "–"}[r.exported]
    status = {PASS: "✅ pass", MISMATCH: "❌ mismatch", FAIL: "❌ fail", TIMEOUT: "⏱ timeout"}.get(r.status, r.status)
    reason = r.reason.replace("|", "\\|").replace("\n", " ")
    cells = [f"`{r.model_type}`", status, exported, _ops_cell(r.ops), r.greedy or "–", f"{r.time_s:.0f}", reason]
    return "| " + " | ".join(cells) + " |"


def render_markdown(results: Sequence[CoverageResult], command: str = "autodeploy coverage") -> str:
    required = [r for r in results if r.model_type in REQUIRED]
    others = sorted((r for r in results if r.model_type not in REQUIRED), key=lambda r: (_ORDER.get(r.status, 9), r.model_type))
    counts = Counter(r.status for r in results)
    header = "| model_type | status | exported | canonical ops after pattern matching | greedy = HF | time (s) | reason |"
    rule = "|---|---|---|---|---|---|---|"
    lines = [
        "# Architecture coverage",
        "",
        f"Generated by `{command}` (`scripts/coverage.py`); do not edit by hand.",
        "",
        "Each row: the tiny random-weight model of `autodeploy/models/tiny.py` (float32, CPU) through the whole",
        f"pipeline, then greedy generation of {MAX_NEW_TOKENS} tokens for prompts of {', '.join(map(str, PROMPT_LENGTHS))}"
        " tokens batched together, compared with Hugging Face `generate` for each prompt alone. Each architecture runs",
        "in its own subprocess with a timeout. *Canonical ops* are the `autodeploy::` ops in the graph after the",
        "pattern-matcher stage (before fusion and cache insertion).",
        "",
        "Summary: " + ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: _ORDER.get(s, 9))),
        f" of {len(results)} model types in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`.",
        "",
        "## Required architectures",
        "",
        header,
        rule,
        *(_row(r) for r in sorted(required, key=lambda r: REQUIRED.index(r.model_type))),
        "",
        "## Every other model type in the causal-LM mapping",
        "",
        "*unsupported*: a decoder-only model with a part autodeploy cannot run (refused in the factory, before export,"
        " naming the part). *not decoder-only text*: encoder-decoder, encoder-only or multimodal models that are in"
        " the mapping.",
        "",
        header,
        rule,
        *(_row(r) for r in others),
        "",
    ]
    return "\n".join(lines)


def _main_one(model_type: str) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    result = check_architecture(model_type)
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main_one(sys.argv[1]))
