"""``autodeploy inspect``: what each transform did, and (``--verify``) which one first changed the numbers.

The verifier runs the graph on the same random prompts after export and after every transform and compares
the logits of every prompt's last token with the exported graph's. Before cache insertion the graph is called
directly; after it, through a ``ModelRunner`` with a small KV cache, one prefill per prompt. The first transform
whose outputs differ beyond tolerance is named in a ``VerificationError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from .config import AutoDeployConfig, KVCacheConfig
from .errors import VerificationError
from .executor.kv_cache import allocate_kv_cache
from .executor.model_runner import ModelRunner, StepEntry
from .models import ModelFactory
from .transforms import SharedContext, Transform, get_history
from .transforms.graph import placeholders
from .transforms.pipeline import export_and_transform

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


@dataclass
class VerifyResult:
    name: str
    max_abs_err: float | None
    ok: bool


@dataclass
class TransformVerifier:
    """``after`` hook for ``run_transforms``: checks the last-token logits after each transform."""

    prompts: torch.Tensor  # [B, S]
    tolerance: float
    ctx: SharedContext
    block_size: int = 4
    reference: torch.Tensor | None = None  # [B, V]
    results: list[VerifyResult] = field(default_factory=list)

    def last_token_logits(self, gm: GraphModule) -> torch.Tensor:
        names = [p.name for p in placeholders(gm)]
        if names == ["input_ids", "position_ids"]:
            b, s = self.prompts.shape
            positions = torch.arange(s, device=self.prompts.device).expand(b, s)
            with torch.inference_mode():
                return gm(self.prompts, positions)[:, -1].float()
        return self._run_cached(gm, names)

    def _run_cached(self, gm: GraphModule, names: list[str]) -> torch.Tensor:
        b, s = self.prompts.shape
        pages = (s + self.block_size - 1) // self.block_size
        caches = allocate_kv_cache(self.ctx.cache, KVCacheConfig(block_size=self.block_size), b * pages, self.ctx.device)
        runner = ModelRunner(
            gm,
            self.ctx.cache,
            caches,
            device=self.ctx.device,
            block_size=self.block_size,
            max_num_tokens=b * s,
            max_batch_size=b,
            max_seq_len=s,
        )
        entries = [
            StepEntry(self.prompts[i].tolist(), 0, list(range(i * pages, (i + 1) * pages)), True) for i in range(b)
        ]
        inputs = runner._pack(entries, num_prefill=b)
        inputs = {k: v for k, v in inputs.items() if k in names}
        with torch.inference_mode():
            logits = gm(**inputs)[0]
        if logits.shape[0] != b:  # logits of every token: keep each prompt's last
            logits = logits[torch.arange(1, b + 1) * s - 1]
        return logits.float()

    def before(self, transform: Transform, gm: GraphModule) -> None:
        if self.reference is None:
            self.reference = self.last_token_logits(gm)

    def after(self, transform: Transform, gm: GraphModule) -> None:
        if not transform.config.enabled:
            return
        logits = self.last_token_logits(gm)
        err = (logits - self.reference).abs().max().item()
        ok = bool(err <= self.tolerance * max(1.0, self.reference.abs().max().item()))
        self.results.append(VerifyResult(transform.name, err, ok))
        if not ok:
            error = VerificationError(
                f"transform {transform.name!r} changed the logits by {err:.3g} (tolerance {self.tolerance:g})",
                where=f"stage {transform.config.stage.value}",
                hint=f"disable it with --set transforms.{transform.name}.enabled=false and report the model",
            )
            error.gm, error.results = gm, self.results
            raise error


def inspect_model(
    model, config: AutoDeployConfig, verify: bool = False, num_prompts: int = 2, prompt_len: int = 9
) -> tuple[GraphModule, list[VerifyResult]]:
    """Run the pipeline (up to and including cache insertion) and return the graph and verify results."""
    factory = ModelFactory(
        model,
        dtype=config.dtype,
        device=config.device,
        random_weights=config.random_weights,
        trust_remote_code=config.trust_remote_code,
        load_eagerly=verify,
    )
    ctx = SharedContext(device=factory.device, dtype=factory.dtype, factory=factory)
    verifier = None
    if verify:
        gen = torch.Generator().manual_seed(0)
        vocab = factory.config.get_text_config().vocab_size
        prompts = torch.randint(0, vocab, (num_prompts, prompt_len), generator=gen).to(factory.device)
        verifier = TransformVerifier(prompts, TOLERANCE.get(factory.dtype, 5e-2), ctx)
    hooks = {"before": verifier.before, "after": verifier.after} if verifier else {}
    gm, _ = export_and_transform(factory, config, ctx, **hooks)
    return gm, (verifier.results if verifier else [])


def history_rows(gm: GraphModule) -> list[dict]:
    return [info.model_dump(mode="json") for info in get_history(gm).values()]
