"""transformers' grouped-mm experts, as search/replace pairs -> ``autodeploy::torch_moe``.

With the ``route_experts`` export patch off, a Hugging Face MoE block exports its experts as transformers'
``grouped_mm_experts_forward`` (the default ``experts_implementation``): sort the (token, expert) pairs, gather,
two grouped matmuls with the gate function between, scatter back, sum over ``top_k``. The search functions call
that very function on ``StandIn``, a small object holding the pattern's inputs under the attribute names
transformers reads, so a pattern is exactly what a model exports. Each ``MoeForm`` fixes what the module's flags
and gate select:

- ``transposed`` (``is_transposed``: weights ``[E, H, U]`` instead of ``[E, U, H]``), ``bias`` (``has_bias``);
- ``gate``: ``glu`` (``has_gate`` with transformers' default gate, ``act(gate) * up`` on ``chunk(2)``), ``plain``
  (``has_gate=False``: ``act(up)``), ``swiglu_oai`` (gpt-oss's clamped gate on interleaved rows) or
  ``swiglu_oai_chunked`` (the same on concatenated halves); ``activation`` one of ``custom_ops.activation``.

The grouped matmul is ``transformers.grouped_mm_fallback`` for non-bfloat16 weights and ``aten._grouped_mm`` for
bfloat16 (patterns traced in float32 / bfloat16), and the expert histogram is taken over float32 ids on CPU but
int32 ids elsewhere (patterns traced on CPU / on the meta device). Patterns are grouped by what a graph shows
without matching (``ExpertsLayout``: matmul op, histogram ids, weight layout, bias): ``MOE_GROUPS[layout]``, so a
transform traces only the groups its graph holds. The number of experts, ``top_k``, the number of (token, expert)
pairs and gpt-oss's ``limit``/``alpha`` are bound to the model's values. The router stays in the graph: the
replacement takes its ``top_k`` ids and weights.

Not matched: gates ``torch_moe`` cannot express (clamped SiLU: DeepSeek-V4, HY-V4, GLM-5, Step-3), transformers'
``batched_mm`` and ``eager`` experts, hidden states in another dtype than the expert weights (a cast before the
matmul), and experts written by hand without the experts interface.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers.integrations.moe import grouped_mm_experts_forward

from .. import custom_ops  # noqa: F401  (registers autodeploy::torch_moe)
from ..custom_ops.activation import ACTIVATIONS
from .matcher import Accept, Reject
from .registry import register_pattern

MatmulKind = Literal["mm_fallback", "grouped_mm"]
HistcKind = Literal["float_histc", "int_histc"]
Gate = Literal["glu", "plain", "swiglu_oai", "swiglu_oai_chunked"]


@dataclass(frozen=True)
class ExpertsLayout:
    """What an exported experts subgraph shows before it is matched: it picks the pattern group to try."""

    mm: MatmulKind
    histc: HistcKind
    transposed: bool
    bias: bool

    @property
    def group(self) -> str:
        return f"moe_{self.mm}_{self.histc}" + "_transposed" * self.transposed + "_bias" * self.bias


MOE_GROUPS: dict[ExpertsLayout, str] = {
    layout: layout.group
    for layout in (
        ExpertsLayout(mm, histc, transposed, bias)
        for mm in ("mm_fallback", "grouped_mm")
        for histc in ("float_histc", "int_histc")
        for transposed in (False, True)
        for bias in (False, True)
    )
}
_TRACE_DTYPE: dict[MatmulKind, torch.dtype] = {"mm_fallback": torch.float32, "grouped_mm": torch.bfloat16}
_TRACE_DEVICE: dict[HistcKind, str] = {"float_histc": "cpu", "int_histc": "meta"}

# distinctive example sizes (multiples of 8 where grouped_mm needs 16-byte strides); the scalars are bound
_E, _K, _T, _H, _I = 7, 3, 16, 24, 16
_LIMIT, _ALPHA = 9.5, 1.625
_SCALARS = {"num_experts": _E, "last_expert": _E - 1, "top_k": _K, "num_pairs": _T * _K}
_OAI_SCALARS = {"limit": _LIMIT, "neg_limit": -_LIMIT, "alpha": _ALPHA}


def _val(node: Any) -> Any:
    return node.meta.get("val") if hasattr(node, "meta") else None


def swiglu_oai(gate_up: torch.Tensor, limit: float, alpha: float, interleaved: bool) -> torch.Tensor:
    """gpt-oss's gate, written as the model writes it (``custom_ops.moe.moe_glu`` ``"swiglu_oai"``)."""
    gate, up = (gate_up[..., ::2], gate_up[..., 1::2]) if interleaved else gate_up.chunk(2, dim=-1)
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


class StandIn:
    """The attributes ``grouped_mm_experts_forward`` reads from an experts module, holding the pattern's inputs."""

    has_post_expert_norm = False  # read by transformers >= 5.2x (a norm on each expert's output: not matched)
    _is_expert_parallel = False  # the same (expert-parallel sentinels)

    def __init__(self, form: MoeForm, tensors: dict[str, torch.Tensor]):
        self.num_experts = _E
        self.has_gate = form.gate != "plain"
        self.has_bias = form.bias
        self.is_transposed = form.transposed
        up = "gate_up_proj" if self.has_gate else "up_proj"
        setattr(self, up, tensors["w_up"])
        self.down_proj = tensors["w_down"]
        setattr(self, f"{up}_bias", tensors.get("b_up"))
        self.down_proj_bias = tensors.get("b_down")
        self.act_fn = ACTIVATIONS[form.activation]
        self._form = form

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._form.gate == "glu":  # transformers' _default_apply_gate
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        return swiglu_oai(gate_up, _LIMIT, _ALPHA, interleaved=self._form.gate == "swiglu_oai")


def _named(fn: Callable[..., Any], names: list[str]) -> Callable[..., Any]:
    """``fn(*args)`` with a signature naming its parameters (the matcher names pattern inputs after them)."""

    def named(*args: Any) -> Any:
        return fn(*args)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    named.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in names])  # type: ignore[attr-defined]
    return named


@dataclass(frozen=True)
class MoeForm:
    """One experts module configuration, as its flags and gate select the grouped-mm forward."""

    transposed: bool
    bias: bool
    gate: Gate
    activation: str = "silu"

    @property
    def gated(self) -> bool:
        return self.gate != "plain"

    @property
    def names(self) -> list[str]:
        return ["hidden", "top_k_index", "top_k_weights", "w_up", "w_down"] + (
            ["b_up", "b_down"] if self.bias else []
        )

    @property
    def op_activation(self) -> str:
        return "swiglu_oai" if self.gate.startswith("swiglu_oai") else self.activation

    def search(self, *args: torch.Tensor) -> torch.Tensor:
        tensors = dict(zip(self.names, args))
        experts = StandIn(self, tensors)
        return grouped_mm_experts_forward(
            experts, tensors["hidden"], tensors["top_k_index"], tensors["top_k_weights"]
        )

    def replace(
        self,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        out_dtype: torch.dtype,
        b_up: torch.Tensor | None = None,
        b_down: torch.Tensor | None = None,
        limit: float | None = None,
        alpha: float | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if self.transposed:
            w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)  # -> [E, U, H], [E, H, I]
        out = torch.ops.autodeploy.torch_moe(
            hidden,
            top_k_index,
            top_k_weights,
            w_up,
            w_down,
            b_up,
            b_down,
            self.op_activation,
            self.gated,
            self.gate == "swiglu_oai",
            limit,
            alpha,
        )  # [T, H] in hidden's dtype
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def check(self, kw: dict[str, Any]) -> Accept | Reject:
        hidden, ids, weights, w_up, w_down = (_val(kw[n]) for n in self.names[:5])
        if hidden is None or hidden.dim() != 2 or ids.dim() != 2 or w_up.dim() != 3 or w_down.dim() != 3:
            return Reject("hidden states are not [T, H] or expert weights not [E, ., .]")
        num_experts = kw["num_experts"]
        if not isinstance(num_experts, int) or kw["last_expert"] != num_experts - 1:
            return Reject(f"histogram bins {num_experts} and last expert {kw['last_expert']} disagree")
        if ids.shape[-1] != kw["top_k"]:
            return Reject(f"top_k ids have {ids.shape[-1]} columns, the experts gather {kw['top_k']}")
        up = w_up.transpose(1, 2) if self.transposed else w_up  # [E, U, H]
        down = w_down.transpose(1, 2) if self.transposed else w_down  # [E, H, I]
        inter = down.shape[2]
        if up.shape[0] != num_experts or down.shape[0] != num_experts:
            return Reject(f"{num_experts} experts, but weights for {up.shape[0]} and {down.shape[0]}")
        if up.shape[1] != (2 * inter if self.gated else inter) or up.shape[2] != down.shape[1]:
            return Reject(f"expert weight shapes {tuple(w_up.shape)} and {tuple(w_down.shape)} do not chain")
        if self.gate.startswith("swiglu_oai") and kw["neg_limit"] != -kw["limit"]:
            return Reject(f"gate clamps to {kw['neg_limit']}..{kw['limit']}, not a symmetric limit")
        return Accept(out_dtype=torch.promote_types(w_down.dtype, weights.dtype))

    def example_inputs(self, device: str) -> list[torch.Tensor]:
        up = 2 * _I if self.gated else _I
        w_up, w_down = (_H, up), (_I, _H)
        if not self.transposed:
            w_up, w_down = w_up[::-1], w_down[::-1]
        inputs = [
            torch.randn(_T, _H),
            torch.randint(0, _E, (_T, _K)),
            torch.rand(_T, _K),
            torch.randn(_E, *w_up),
            torch.randn(_E, *w_down),
        ]
        inputs += [torch.randn(_E, up), torch.randn(_E, _H)] if self.bias else []
        return [x.to(device) for x in inputs]

    def register(self) -> None:
        scalars = _SCALARS | (_OAI_SCALARS if self.gate.startswith("swiglu_oai") else {})
        search = _named(self.search, self.names)
        for layout, group in MOE_GROUPS.items():
            if (layout.transposed, layout.bias) != (self.transposed, self.bias):
                continue
            inputs = self.example_inputs(_TRACE_DEVICE[layout.histc])
            pattern = register_pattern(group, search, self.replace, inputs, self.check, scalars, builtin=True)
            pattern.dtypes = (_TRACE_DTYPE[layout.mm],)
            pattern.any_size = True


#: Inductor's matcher ignores keyword arguments a pattern leaves out (``gelu(x)`` matches ``gelu(x, approximate=
#: "tanh")``): patterns are tried in registration order, so the tanh GELU goes first
_ACTIVATION_ORDER = sorted(ACTIVATIONS, key=lambda name: name != "gelu_tanh")


def _forms() -> list[MoeForm]:
    forms = []
    for transposed in (False, True):
        for bias in (False, True):
            forms += [
                MoeForm(transposed, bias, gate, act) for gate in ("glu", "plain") for act in _ACTIVATION_ORDER
            ]
            forms += [MoeForm(transposed, bias, gate) for gate in ("swiglu_oai", "swiglu_oai_chunked")]
    return forms


MOE_FORMS = _forms()
for _form in MOE_FORMS:
    _form.register()
