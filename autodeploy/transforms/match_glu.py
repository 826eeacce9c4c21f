"""``match_glu``: the gated core of a GLU MLP becomes ``autodeploy::torch_glu`` (or ``torch_glu_packed``).

Matches (patterns in ``patterns/glu.py``): ``act(gate) * up`` in either operand order, where ``gate`` and ``up``
are ``aten.linear`` outputs of the same input (SwiGLU, GeGLU: Llama, Qwen, Gemma, Mixtral's dense layers), and the
packed form ``gate, up = gate_up.chunk(2, -1)`` of one linear (Phi-3); ``act`` is ``silu``, ``gelu``,
``gelu_tanh`` or ``relu``.

Emits ``torch_glu(gate, up, act)`` / ``torch_glu_packed(gate_up, act)``; the gate, up and down linears stay
``aten.linear`` nodes for quantization and sharding.

Limits: activations written out by hand (GPT-2's ``gelu_new`` tanh formula), products of non-linear outputs
(e.g. inside transformers' MoE experts, left for ``match_moe``) and non-gated MLPs are not matched. Activations
still multiplied by something are listed in ``details["unmatched"]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from ..patterns import PatternSet, pattern_set
from ..patterns.glu import GLU_GROUPS
from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, is_op

aten = torch.ops.aten
_ACTIVATIONS = (aten.silu.default, aten.gelu.default, aten.relu.default)


@TransformRegistry.register("match_glu")
class MatchGlu(Transform):
    _patterns: ClassVar[PatternSet | None] = None  # traced once per process

    @classmethod
    def pattern_set(cls) -> PatternSet:
        if cls._patterns is None:
            cls._patterns = pattern_set(*GLU_GROUPS)
            cls._patterns.match_meta = True
        return cls._patterns

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        patterns = self.pattern_set()
        num_matches = patterns.apply(gm)
        details: dict[str, Any] = {"matches_by_pattern": dict(patterns.matches_by_pattern)}
        rejected = patterns.live_rejections(gm)
        if rejected:
            details["rejected"] = rejected
        unmatched = [
            n.name for n in find_nodes(gm, _ACTIVATIONS) if any(is_op(u, aten.mul.Tensor) for u in n.users)
        ]
        if unmatched:
            details["unmatched"] = unmatched
        return TransformInfo(num_matches=num_matches, details=details)
