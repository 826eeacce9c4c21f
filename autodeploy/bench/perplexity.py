"""Perplexity through the engine's own graph: every transform up to, not including, KV-cache insertion.

``logits_graph(model, **config)`` runs the factory, export and every configured transform of the stages before
``cache_init`` (so quantization, weight loading and fusion included) and returns the graph
``(input_ids [B, S], position_ids [B, S]) -> logits [B, S, V]``. ``perplexity(gm, ids)`` feeds a text through it
in windows of ``window`` tokens and returns ``exp(mean next-token NLL)``.

``english_text()`` is the fixed text: the first file found of ``TEXT_CANDIDATES`` (Python's own LICENSE, which
every CPython install has, then the Apache-2.0 LICENSE shipped with transformers, then Debian's copy).

Why this graph: it holds the exact linears, norms, RoPE and MLPs the engine runs, and returns logits for every
position, which is what perplexity needs, in one forward per window. Cache insertion then only swaps
``torch_attention`` for a paged op with the same math (tested against it separately) and keeps the sampled
rows' logits, so going through the paged executor would add nothing to the measurement.
"""

from __future__ import annotations

import importlib.metadata
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from ..config import build_config
from ..models import ModelFactory
from ..transforms import Stage
from ..transforms.pipeline import export_and_transform

BEFORE_CACHE = [stage for stage in Stage if stage.order < Stage.CACHE_INIT.order]


def _transformers_license() -> Path | None:
    dist = importlib.metadata.distribution("transformers")
    path = next((f for f in dist.files or [] if f.name == "LICENSE"), None)
    return Path(str(dist.locate_file(path))) if path else None


def text_candidates() -> list[Path]:
    version = "python%d.%d" % sys.version_info[:2]
    candidates = [Path(sys.base_prefix) / "lib" / version / "LICENSE.txt", Path(sys.prefix) / "lib" / version / "LICENSE.txt"]
    return [*candidates, *filter(None, [_transformers_license()]), Path("/usr/share/common-licenses/Apache-2.0")]


def english_text(min_chars: int = 8000) -> tuple[Path, str]:
    """``(path, text)`` of the first candidate that exists and holds at least ``min_chars`` characters."""
    for path in text_candidates():
        if path.is_file():
            text = path.read_text(errors="replace")
            if len(text) >= min_chars:
                return path, text
    raise FileNotFoundError(f"no English text for perplexity among {[str(p) for p in text_candidates()]}")


def logits_graph(model: Any, tokenizer: Any = None, **overrides: Any) -> tuple[GraphModule, ModelFactory]:
    config = build_config(overrides)
    factory = ModelFactory(
        model, dtype=config.dtype, device=config.device, random_weights=config.random_weights,
        tokenizer=tokenizer if tokenizer is not None else config.tokenizer, trust_remote_code=config.trust_remote_code,
    )
    gm, _ = export_and_transform(factory, config, stages=BEFORE_CACHE)
    return gm, factory


@torch.inference_mode()
def perplexity(gm: GraphModule, token_ids: torch.Tensor | list[int], window: int = 4096) -> float:
    """``exp`` of the mean negative log-likelihood of each token given the ones before it (within its window)."""
    ids = torch.as_tensor(token_ids).reshape(-1)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1].to(device)
        if chunk.numel() < 2:
            break
        inputs = chunk[:-1].unsqueeze(0)  # [1, S]
        positions = torch.arange(inputs.shape[1], device=device).unsqueeze(0)
        logits = gm(inputs, positions)[0].float()  # [S, V]
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(total / count)
