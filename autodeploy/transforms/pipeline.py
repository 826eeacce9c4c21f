"""The ordered list of transforms built from config, and running it over a graph.

``build_transforms(config)`` instantiates every transform under ``config.transforms`` (validated by the
transform's own config class), sorted by stage and, within a stage, by YAML order. ``run_transforms`` applies
those of the requested stages and calls ``on_transform(name, gm_before_copy, gm_after)`` hooks when given
(``inspect --verify`` uses this to check each transform numerically).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import Any

from torch.fx import GraphModule

from ..config import AutoDeployConfig
from ..export import export_causal_lm
from ..models import ModelFactory
from .base import SharedContext, Stage, Transform, TransformRegistry

TransformHook = Callable[[Transform, GraphModule], None]


def build_transforms(config: AutoDeployConfig) -> list[Transform]:
    from . import library  # noqa: F401  (registers the built-in transforms)

    transforms = [TransformRegistry.get(name)(dict(raw)) for name, raw in config.transforms.items()]
    return sorted(transforms, key=lambda t: t.config.stage.order)  # stable: YAML order within a stage


def run_transforms(
    gm: GraphModule,
    transforms: Iterable[Transform],
    ctx: SharedContext,
    stages: Iterable[Stage] | None = None,
    before: TransformHook | None = None,
    after: TransformHook | None = None,
) -> GraphModule:
    wanted = set(stages) if stages is not None else None
    for transform in transforms:
        if wanted is not None and transform.config.stage not in wanted:
            continue
        if before is not None:
            before(transform, gm)
        gm = transform(gm, ctx)
        if after is not None:
            after(transform, gm)
    return gm


def transforms_summary(gm: GraphModule) -> list[dict[str, Any]]:
    from .base import get_history

    return [info.model_dump(mode="json") for info in get_history(gm).values()]


def export_and_transform(
    factory: ModelFactory,
    config: AutoDeployConfig,
    ctx: SharedContext | None = None,
    stages: Iterable[Stage] | None = None,
    before: TransformHook | None = None,
    after: TransformHook | None = None,
) -> tuple[GraphModule, SharedContext]:
    """Factory -> export -> every configured transform (of ``stages``). Returns the graph and the context."""
    ctx = ctx or SharedContext(device=factory.device, dtype=factory.dtype, factory=factory)
    model = factory.build_model()
    max_seq_len = config.max_seq_len or factory.max_position_embeddings or 8192
    gm = export_causal_lm(model, config.export, max_batch=max(config.max_batch_size, 2), max_seq_len=max_seq_len)
    # The source model's modules hold reference cycles, so they outlive ``del`` until the collector runs, and with
    # them every weight a transform replaces (fused, quantized): collected now, each such weight is freed as soon as
    # its transform drops it (the build's peak memory, and the free memory the KV cache is sized from).
    del model
    gc.collect()
    gm = run_transforms(gm, build_transforms(config), ctx, stages, before, after)
    return gm, ctx
