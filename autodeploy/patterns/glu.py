"""Gated MLP cores as search/replace pairs -> ``autodeploy::torch_glu`` / ``torch_glu_packed``.

- group ``glu``: ``act(gate) * up`` and ``up * act(gate)`` where ``gate`` and ``up`` are two ``aten.linear`` of one
  input (Llama, Qwen, Mixtral's shared experts, Gemma's GeGLU) -> ``torch_glu(gate, up, act)``; the linears stay;
- group ``glu_packed``: ``gate, up = gate_up.chunk(2, -1)`` of one ``aten.linear``, then either product (Phi-3)
  -> ``torch_glu_packed(gate_up, act)``.

``act`` is ``silu``, ``gelu``, ``gelu_tanh`` (``gelu(approximate="tanh")``) or ``relu``. Products whose operands
are not linear outputs (a MoE's experts, elementwise gates elsewhere) are refused, so a later MoE match still sees
its experts intact. Inductor's matcher ignores keyword arguments a pattern leaves out, so ``gelu(x)`` would also
match ``gelu(x, approximate="tanh")``: the tanh form is tried first and the check reads the node's ``approximate``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.fx import Node

from .. import custom_ops  # noqa: F401  (registers autodeploy::torch_glu*)
from .matcher import Reject
from .registry import register_pattern

aten = torch.ops.aten

GLU_GROUP = "glu"
PACKED_GROUP = "glu_packed"
GLU_GROUPS = (GLU_GROUP, PACKED_GROUP)

#: the activations a GLU is matched with, as ``autodeploy.custom_ops.activation`` names them (tanh GELU first)
GLU_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}

_ROWS, _INTERMEDIATE = 6, 20


def _is_linear(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == aten.linear.default


def _gelu_matches(gate: Node, activation: str) -> bool:
    """Whether a ``gelu`` reading ``gate`` approximates as ``activation`` says (non-GELU activations: True)."""
    if activation not in _GELU_APPROXIMATE:
        return True
    gelus = [u for u in gate.users if u.target == aten.gelu.default]
    return any(u.kwargs.get("approximate", "none") == _GELU_APPROXIMATE[activation] for u in gelus)


def _check_pair(activation: str) -> Callable[[dict[str, Any]], bool | Reject]:
    def check(kw: dict[str, Any]) -> bool | Reject:
        gate, up = kw["gate"], kw["up"]
        if not (_is_linear(gate) and _is_linear(up)):
            return Reject("gate and up are not both outputs of a linear")
        if gate.args[0] is not up.args[0]:
            return Reject("gate and up are linears of different inputs")
        if tuple(gate.meta["val"].shape) != tuple(up.meta["val"].shape):
            return Reject("gate and up shapes differ")
        return _gelu_matches(gate, activation)

    return check


def _check_packed(activation: str) -> Callable[[dict[str, Any]], bool | Reject]:
    def check(kw: dict[str, Any]) -> bool | Reject:
        gate_up = kw["gate_up"]
        if not _is_linear(gate_up):
            return Reject("gate_up is not the output of a linear")
        chunks = [u for u in gate_up.users if u.target == aten.chunk.default]
        gates = [
            g for chunk in chunks for g in chunk.users if g.target is operator.getitem and g.args[1] == 0
        ]
        return any(_gelu_matches(gate, activation) for gate in gates)

    return check


@dataclass(frozen=True)
class GluForm:
    activation: str
    packed: bool
    order: Literal["act_first", "up_first"]

    def _product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        act = GLU_ACTIVATIONS[self.activation](gate)
        return act * up if self.order == "act_first" else up * act

    def search_pair(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._product(gate, up)

    def search_packed(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self._product(gate, up)

    def replace_pair(self, gate: torch.Tensor, up: torch.Tensor, **_: Any) -> torch.Tensor:
        return torch.ops.autodeploy.torch_glu(gate, up, self.activation)

    def replace_packed(self, gate_up: torch.Tensor, **_: Any) -> torch.Tensor:
        return torch.ops.autodeploy.torch_glu_packed(gate_up, self.activation)

    def register(self) -> None:
        if self.packed:
            inputs = [torch.randn(_ROWS, 2 * _INTERMEDIATE)]
            check = _check_packed(self.activation)
            pattern = register_pattern(
                PACKED_GROUP, self.search_packed, self.replace_packed, inputs, check, builtin=True
            )
        else:
            inputs = [torch.randn(_ROWS, _INTERMEDIATE), torch.randn(_ROWS, _INTERMEDIATE)]
            check = _check_pair(self.activation)
            pattern = register_pattern(
                GLU_GROUP, self.search_pair, self.replace_pair, inputs, check, builtin=True
            )
        pattern.dtypes = (torch.float32,)  # no casts: the same pattern in every dtype


GLU_FORMS = [
    GluForm(activation, packed, order)
    for packed in (True, False)
    for activation in GLU_ACTIVATIONS
    for order in ("act_first", "up_first")
]
for _form in GLU_FORMS:
    _form.register()
