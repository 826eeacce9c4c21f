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

import torch
from torch.fx import GraphModule

from ..patterns.rmsnorm import RMSNORM_GROUPS
from .base import TransformRegistry
from .graph import find_nodes
from .pattern_transform import PatternTransform


@TransformRegistry.register("match_rmsnorm")
class MatchRMSNorm(PatternTransform):
    pattern_groups = RMSNORM_GROUPS

    def unmatched(self, gm: GraphModule) -> list[str]:
        return [n.name for n in find_nodes(gm, torch.ops.aten.rsqrt.default)]
