"""The public entry points: ``optimize(model, **config) -> Engine`` and ``LLM`` (vLLM / TensorRT-LLM style).

``optimize`` runs the whole pipeline (factory, export, every configured transform, cache allocation and
CUDA-graph capture) and returns the engine; ``LLM`` wraps that engine with the familiar offline API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import AutoDeployConfig, build_config
from .executor.engine import Engine, Prompt
from .executor.outputs import RequestOutput
from .executor.sampling_params import SamplingParams
from .models import ModelFactory
from .transforms.pipeline import export_and_transform

ModelArg = torch.nn.Module | str | Path | None
ProgressCallback = Callable[[str], None]


def optimize(
    model: ModelArg = None,
    *,
    tokenizer: Any = None,
    config: AutoDeployConfig | None = None,
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> Engine:
    """Build an engine for ``model`` (a ``PreTrainedModel``, checkpoint folder, GGUF, ``config.json`` or None).

    Keyword overrides are config keys, plain or dotted (``max_batch_size=8``,
    ``**{"transforms.match_rope.enabled": False}``). With ``tensor_parallel_size=N > 1`` the graph is sharded over
    N ranks: N-1 worker processes are started here (one per GPU), or, under ``torchrun``, every process calls this
    and only rank 0 returns (see ``executor/tensor_parallel.py``). ``engine.shutdown()`` stops the workers.
    """
    config = config or build_config(overrides)
    if config.tensor_parallel_size > 1:  # rank 0's engine; the other ranks are spawned (or joined under torchrun)
        from .executor.tensor_parallel import optimize_tensor_parallel

        return optimize_tensor_parallel(model, tokenizer, config, progress)
    say = progress or (lambda message: None)
    factory = ModelFactory(
        model,
        dtype=config.dtype,
        device=config.device,
        random_weights=config.random_weights,
        tokenizer=tokenizer if tokenizer is not None else config.tokenizer,
        trust_remote_code=config.trust_remote_code,
    )
    if factory.random_weights:
        torch.manual_seed(config.seed)  # reproducible random weights (tensor-parallel ranks draw the same)
    say(f"Exporting and transforming {factory.source.name}")
    gm, ctx = export_and_transform(factory, config)
    say("Allocating the KV cache" + (" and capturing CUDA graphs" if config.cuda_graphs else ""))
    return Engine(gm, ctx, config, factory)


class LLM:
    """Offline generation: ``LLM(model).generate(prompts, SamplingParams(...))``."""

    def __init__(
        self, model: ModelArg = None, *, tokenizer: Any = None, progress: ProgressCallback | None = None, **config: Any
    ):
        self.engine = optimize(model, tokenizer=tokenizer, progress=progress, **config)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine; with ``tensor_parallel_size > 1`` also its worker ranks."""
        self.engine.shutdown()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        return self.engine.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate_async(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        return self.engine.generate_async(prompt, sampling_params, request_id=request_id)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.engine.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params)
