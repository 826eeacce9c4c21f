"""match_moe through the shared harness, on models exported with the ``route_experts`` patch off so transformers'
grouped-mm experts stay in the graph: Mixtral (float32 fallback matmul; bfloat16 ``_grouped_mm`` with float32
router weights), gpt-oss (transposed, biased, clamped interleaved gate), other module flags and activations, an
unsupported gate left alone, and the meta-device form of big checkpoints. Matches must agree with what the export
patch routes."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

from autodeploy.config import ExportConfig
from autodeploy.export import export_causal_lm
from autodeploy.export.route_experts import experts_modules
from autodeploy.models.tiny import tiny_config, tiny_model
from autodeploy.transforms import SharedContext, run_transforms
from autodeploy.transforms.graph import find_nodes
from transform_harness import check_transforms, count_op, make_transforms

aten = torch.ops.aten
MOE = torch.ops.autodeploy.torch_moe.default
GROUPED_MMS = [torch.ops.transformers.grouped_mm_fallback.default, aten._grouped_mm.default]
EXPERT_OPS = [
    *GROUPED_MMS,
    aten.histc.default,
    aten.sort.default,
    aten.index_put_.default,
    aten.clamp_.default,
]
TRANSFORMS = ["cleanup_noop_ops", "match_moe"]
NO_ROUTING = ["route_experts"]
_DEFAULTS = (None, None, None, None, None, None, None, "silu", True, False, None, None)


def _source(arg):
    """The parameter behind a weight argument (through a transposed view)."""
    if isinstance(arg, torch.fx.Node) and arg.target == aten.transpose.int:
        return ("T", _source(arg.args[0]))
    return arg.target if isinstance(arg, torch.fx.Node) else arg


def _moe_signature(gm) -> list[tuple]:
    """Weights, biases and (activation, gated, interleaved, limit, alpha) of each torch_moe, sorted."""
    out = []
    for node in find_nodes(gm, MOE):
        args = tuple(node.args) + _DEFAULTS[len(node.args) :]
        out.append(tuple(_source(a) for a in args[3:7]) + args[7:])
    return sorted(out, key=str)


def _check(model, group: str, dtype_tol: float = 1e-4):
    layers = model.config.num_hidden_layers
    gm, history = check_transforms(
        model,
        TRANSFORMS,
        {MOE: layers},
        EXPERT_OPS,
        disabled_patches=NO_ROUTING,
        atol=dtype_tol,
        rtol=dtype_tol,
    )
    info = history["match_moe"]
    assert info.num_matches == layers and info.details["matches_by_pattern"] == {group: layers}
    assert "rejected" not in info.details and "unmatched" not in info.details, info.details
    return gm, info


@pytest.mark.parametrize(
    "model_type, group",
    [("mixtral", "moe_mm_fallback_float_histc"), ("gpt_oss", "moe_mm_fallback_float_histc_transposed_bias")],
)
def test_grouped_mm_experts_match_what_export_routes(model_type, group):
    model = tiny_model(model_type)
    gm, _ = _check(model, group)
    assert _moe_signature(gm) == _moe_signature(export_causal_lm(model))  # same op, arguments and weights
    if model_type == "gpt_oss":
        assert {sig[4:] for sig in _moe_signature(gm)} == {("swiglu_oai", True, True, 7.0, 1.702)}


def test_bfloat16_experts_with_float32_router_weights():
    """bfloat16 weights take ``aten._grouped_mm``; Mixtral's router weights are float32, so the experts' sum is
    float32 and cast back: the op returns bfloat16 directly."""
    gm, info = _check(tiny_model("mixtral", dtype=torch.bfloat16), "moe_grouped_mm_float_histc", 3e-2)
    assert info.details["casts_folded"] == 2
    assert all(node.meta["val"].dtype == torch.bfloat16 for node in find_nodes(gm, MOE))


def _set_experts(model, transposed: bool, bias: bool, gated: bool, activation: str) -> None:
    """Give every experts module other flags, weights in that layout and another activation."""
    for experts in experts_modules(model):
        up_name = "gate_up_proj" if gated else "up_proj"
        w_up = experts.gate_up_proj.data
        if not gated:
            del experts.gate_up_proj
            w_up = w_up[:, : w_up.shape[1] // 2]  # [E, I, H]
        weights = {up_name: w_up, "down_proj": experts.down_proj.data}  # [E, U, H], [E, H, I]
        for name, w in weights.items():
            setattr(experts, name, nn.Parameter((w.transpose(1, 2) if transposed else w).contiguous()))
            if bias:
                out_features = w.shape[1]
                setattr(experts, f"{name}_bias", nn.Parameter(0.5 * torch.randn(w.shape[0], out_features)))
        experts.is_transposed, experts.has_bias, experts.has_gate = transposed, bias, gated
        experts.act_fn = ACT2FN[activation]


@pytest.mark.parametrize(
    "transposed, bias, gated, activation, op_activation",
    [(True, True, True, "gelu_pytorch_tanh", "gelu_tanh"), (False, True, False, "relu2", "relu2")],
)
def test_module_flags_and_activations(transposed, bias, gated, activation, op_activation):
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    _set_experts(model, transposed, bias, gated, activation)
    gm, _ = _check(model, "moe_mm_fallback_float_histc" + "_transposed" * transposed + "_bias" * bias)
    signature = _moe_signature(gm)
    assert {sig[4:7] for sig in signature} == {(op_activation, gated, False)}
    assert all((sig[2] is not None) is bias and isinstance(sig[0], tuple) is transposed for sig in signature)


def test_unsupported_gate_is_left_alone():
    """A SiLU of a clamped gate (DeepSeek-V4's form) is no torch_moe activation: the experts stay as exported."""

    def clamped_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate.clamp(max=5.0)) * up.clamp(min=-5.0, max=5.0)

    model = tiny_model("mixtral")
    for experts in experts_modules(model):
        experts._apply_gate = types.MethodType(clamped_gate, experts)
    layers = model.config.num_hidden_layers
    present = {MOE: 0, GROUPED_MMS[0]: 2 * layers}
    _, history = check_transforms(model, TRANSFORMS, present, disabled_patches=NO_ROUTING)
    info = history["match_moe"]
    assert info.num_matches == 0 and len(info.details["unmatched"]) == 2 * layers


def test_meta_device_experts():
    """Big checkpoints are exported on the meta device, where the expert histogram counts int32 ids."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    gm = export_causal_lm(model, ExportConfig(disabled_patches=NO_ROUTING))
    gm = run_transforms(gm, make_transforms(TRANSFORMS), SharedContext())
    info = gm.meta["autodeploy_history"]["match_moe"]
    assert info.details["groups"] == ["moe_mm_fallback_int_histc"]
    assert count_op(gm, MOE) == model.config.num_hidden_layers
    assert all(count_op(gm, op) == 0 for op in EXPERT_OPS)
