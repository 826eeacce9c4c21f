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

import torch
from torch.fx import GraphModule

from ..patterns.glu import GLU_GROUPS
from .base import TransformRegistry
from .graph import find_nodes, is_op
from .pattern_transform import PatternTransform

aten = torch.ops.aten
_ACTIVATIONS = (aten.silu.default, aten.gelu.default, aten.relu.default)


@TransformRegistry.register("match_glu")
class MatchGlu(PatternTransform):
    pattern_groups = GLU_GROUPS

    def unmatched(self, gm: GraphModule) -> list[str]:
        return [n.name for n in find_nodes(gm, _ACTIVATIONS) if any(is_op(u, aten.mul.Tensor) for u in n.users)]
