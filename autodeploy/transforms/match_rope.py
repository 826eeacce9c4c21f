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

from typing import Any

import torch
from torch.fx import GraphModule

from ..export.cleanup import remove_noop_ops
from ..patterns.rope import ROPE_GROUPS
from .base import TransformRegistry
from .graph import find_nodes, is_op, run_shape_prop
from .pattern_transform import PatternTransform

aten = torch.ops.aten


def _unmatched(gm: GraphModule) -> list[str]:
    """``neg`` nodes still feeding a ``cat``/``stack``: the sign flip of a rotation."""
    return [
        n.name
        for n in find_nodes(gm, aten.neg.default)
        if any(is_op(u, (aten.cat, aten.stack)) for u in n.users)
    ]


@TransformRegistry.register("match_rope")
class MatchRope(PatternTransform):
    pattern_groups = ROPE_GROUPS

    def after_matches(self, gm: GraphModule) -> dict[str, Any]:
        gm.graph.eliminate_dead_code()
        run_shape_prop(gm)
        return {"noops_removed": remove_noop_ops(gm)}

    def unmatched(self, gm: GraphModule) -> list[str]:
        return _unmatched(gm)
