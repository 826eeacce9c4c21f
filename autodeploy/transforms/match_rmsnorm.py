"""``match_rmsnorm``: RMSNorm becomes ``autodeploy::torch_rmsnorm``.

Matches (patterns in ``patterns/rmsnorm.py``): ``x * rsqrt(mean(x^2, -1, keepdim) + eps)`` in float32, scaled by a
1-D weight as Llama writes it (``weight * xhat.to(dtype)``, also with the operands swapped or the cast after the
scale) or as Gemma does (``xhat * (1 + weight.float())``, then cast), with or without the float32 casts; any rank
of ``x`` (Qwen3's per-head ``q_norm``/``k_norm`` on ``[B, S, N, D]`` too).

Emits ``torch_rmsnorm(x, weight, eps, weight_offset, out_dtype)``: ``eps`` is the model's, ``weight_offset`` 1.0
for the Gemma form, ``out_dtype`` only when the model returns another dtype than ``x``'s (a float32 weight on
bfloat16 activations).

Limits: ``x / sqrt(...)``, ``x * x`` instead of ``pow(2)``, norms without a weight, and LayerNorm (mean
subtracted: GPT-2, Cohere) are not RMSNorm forms here and stay. The cast-after-scale form (OLMo 2) is emitted as
the op's cast-before-scale, which may differ by one low-precision rounding. ``rsqrt`` nodes left in the graph are
listed in ``details["unmatched"]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from ..patterns import PatternSet, pattern_set
from ..patterns.rmsnorm import RMSNORM_GROUPS
from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes


@TransformRegistry.register("match_rmsnorm")
class MatchRMSNorm(Transform):
    _patterns: ClassVar[PatternSet | None] = None  # traced once per process

    @classmethod
    def pattern_set(cls) -> PatternSet:
        if cls._patterns is None:
            cls._patterns = pattern_set(*RMSNORM_GROUPS)
            cls._patterns.match_meta = True
        return cls._patterns

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        patterns = self.pattern_set()
        num_matches = patterns.apply(gm)
        details: dict[str, Any] = {"matches_by_pattern": dict(patterns.matches_by_pattern)}
        rejected = patterns.live_rejections(gm)
        if rejected:
            details["rejected"] = rejected
        unmatched = [n.name for n in find_nodes(gm, torch.ops.aten.rsqrt.default)]
        if unmatched:
            details["unmatched"] = unmatched
        return TransformInfo(num_matches=num_matches, details=details)
