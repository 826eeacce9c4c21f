"""Route every Hugging Face MoE experts block to ``autodeploy::torch_moe`` while exporting.

transformers' ``ExpertsInterface`` (``config._experts_implementation``) dispatches the experts forward of MoE
models: ``(module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``. The router stays
in the graph as the model wrote it. The module's weights are stacked 3-D parameters; ``is_transposed``,
``has_gate``, ``has_bias`` and ``is_concatenated`` describe their layout, and the gate function is recognised by
evaluating it (``detect_gate``), not by the model's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.integrations.moe import ExpertsInterface

from ..custom_ops.activation import ACTIVATIONS, apply_activation
from ..custom_ops.moe import moe_glu
from ..errors import UnsupportedArchitectureError

AUTODEPLOY_EXPERTS = "autodeploy"


@dataclass(frozen=True)
class GateSpec:
    activation: str
    gated: bool
    interleaved: bool
    limit: float | None = None
    alpha: float | None = None


def _probe(shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen) * 4.0


def activation_name(act_fn: torch.nn.Module) -> str:
    """Which of ``ACTIVATIONS`` ``act_fn`` computes, found by evaluating both on the same probe."""
    x = _probe((64,))
    with torch.no_grad():
        y = act_fn(x)
    for name in ACTIVATIONS:
        if torch.allclose(apply_activation(name, x), y, atol=1e-5):
            return name
    raise UnsupportedArchitectureError(f"unknown MoE activation {type(act_fn).__name__}")


def detect_gate(module: torch.nn.Module) -> GateSpec:
    """Describe the experts' gate function as a ``GateSpec`` by evaluating ``_apply_gate`` on a probe."""
    gated = bool(getattr(module, "has_gate", True))
    act_fn = getattr(module, "act_fn", None)
    if not gated:
        return GateSpec(activation_name(act_fn), gated=False, interleaved=False)
    x = _probe((4, 16))
    with torch.no_grad():
        expected = module._apply_gate(x)
    limit, alpha = getattr(module, "limit", None), getattr(module, "alpha", None)
    candidates = []
    if act_fn is not None:
        name = activation_name(act_fn)
        candidates += [GateSpec(name, True, False), GateSpec(name, True, True)]
    if limit is not None or alpha is not None:
        candidates += [GateSpec("swiglu_oai", True, il, limit, alpha) for il in (True, False)]
    candidates += [GateSpec(name, True, il) for name in ACTIVATIONS for il in (False, True)]
    for spec in candidates:
        got = moe_glu(x, spec.activation, True, spec.interleaved, spec.limit, spec.alpha)
        if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5):
            return spec
    raise UnsupportedArchitectureError(
        f"the gate function of {type(module).__name__} is not one autodeploy knows",
        hint="add its form to autodeploy/custom_ops/moe.py (moe_glu) and to detect_gate",
    )


def autodeploy_experts(
    module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    spec = module._autodeploy_gate_spec
    w_up = module.gate_up_proj if spec.gated else module.up_proj
    w_down = module.down_proj
    if getattr(module, "is_transposed", False):
        w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)  # -> [E, U, H], [E, H, I]
    has_bias = getattr(module, "has_bias", False)
    b_up = (module.gate_up_proj_bias if spec.gated else module.up_proj_bias) if has_bias else None
    b_down = module.down_proj_bias if has_bias else None
    return torch.ops.autodeploy.torch_moe(
        hidden_states,
        top_k_index,
        top_k_weights,
        w_up,
        w_down,
        b_up,
        b_down,
        spec.activation,
        spec.gated,
        spec.interleaved,
        spec.limit,
        spec.alpha,
    )


ExpertsInterface.register(AUTODEPLOY_EXPERTS, autodeploy_experts)


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose forward dispatches through the experts interface."""
    return [m for m in model.modules() if hasattr(type(m), "_apply_gate") and hasattr(m, "down_proj")]


@contextlib.contextmanager
def route_experts(model: torch.nn.Module) -> Iterator[bool]:
    """Within the context, MoE experts call ``torch_moe``. Yields whether any experts block was routed."""
    modules = experts_modules(model)
    if not modules or not isinstance(model, PreTrainedModel):
        yield False
        return
    for module in modules:
        if getattr(module, "has_post_expert_norm", False):  # transformers >= 5.2x: a norm on each expert's output
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} normalises each expert's output (has_post_expert_norm), which torch_moe "
                "does not express",
                hint="add the per-expert norm to autodeploy/custom_ops/moe.py (torch_moe) and its kernels",
            )
        module._autodeploy_gate_spec = detect_gate(module)
    previous = model.config._experts_implementation
    model.set_experts_implementation(AUTODEPLOY_EXPERTS)
    try:
        yield True
    finally:
        model.set_experts_implementation(previous)
        for module in modules:
            del module._autodeploy_gate_spec
