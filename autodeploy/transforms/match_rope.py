"""``match_rope``: rotary position embeddings become ``autodeploy::torch_rope``, one per query and one per key.

Matches (patterns in ``patterns/rope.py``): ``q * cos + rotate(q) * sin`` with NeoX half-split or GPT-J
interleaved rotation, on all channels or on the first ``R`` with the rest joined back by ``cat`` (also the empty
pass-through Phi-3 exports), in the input's dtype or upcast to float32 and cast back, for ``q`` in ``[B, N, S, D]``
(``cos.unsqueeze(1)``) or ``[B, S, N, D]`` (``cos.unsqueeze(2)``) layout.

Emits ``torch_rope(q [B, S, N, D], cos [B, S, R], sin [B, S, R], interleaved)`` with the ``cos``/``sin`` the model
multiplies by (the prologue that computes them stays), then drops the no-ops left behind: the transposes around
our ``bsnd`` op cancel against the model's (``q.view(...).transpose(1, 2)`` before, attention's after).

Limits: ``cos``/``sin`` must vary per batch and sequence position (``[B, S, R]``, as every Hugging Face rotary
embedding returns them) and broadcast over the heads; other rotations (complex-number ``view_as_complex`` forms,
``rotate_half`` written with ``chunk``) are not matched. Rotations left in the graph are listed in
``details["unmatched"]``, refused matches with their reason in ``details["rejected"]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from ..export.cleanup import remove_noop_ops
from ..patterns import PatternSet, pattern_set
from ..patterns.rope import ROPE_GROUPS
from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, is_op, run_shape_prop

aten = torch.ops.aten


def _unmatched(gm: GraphModule) -> list[str]:
    """``neg`` nodes still feeding a ``cat``/``stack``: the sign flip of a rotation."""
    return [
        n.name
        for n in find_nodes(gm, aten.neg.default)
        if any(is_op(u, (aten.cat, aten.stack)) for u in n.users)
    ]


@TransformRegistry.register("match_rope")
class MatchRope(Transform):
    _patterns: ClassVar[PatternSet | None] = None  # traced once per process

    @classmethod
    def pattern_set(cls) -> PatternSet:
        if cls._patterns is None:
            cls._patterns = pattern_set(*ROPE_GROUPS)
            cls._patterns.match_meta = True
        return cls._patterns

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        patterns = self.pattern_set()
        num_matches = patterns.apply(gm)
        details: dict[str, Any] = {"matches_by_pattern": dict(patterns.matches_by_pattern)}
        if num_matches:
            gm.graph.eliminate_dead_code()
            run_shape_prop(gm)
            details["noops_removed"] = remove_noop_ops(gm)
        rejected = patterns.live_rejections(gm)
        if rejected:
            details["rejected"] = rejected
        unmatched = _unmatched(gm)
        if unmatched:
            details["unmatched"] = unmatched
        return TransformInfo(num_matches=num_matches, details=details)
