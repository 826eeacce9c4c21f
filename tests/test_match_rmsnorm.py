"""match_rmsnorm through the shared harness: the casts bfloat16 models insert (Llama, Qwen3 with its per-head q/k
norms, Gemma's ``1 + w``), hand-written forms (weight on either side, cast after the scale, a float32 weight on
bfloat16 activations) with their own eps each. The float32 forms of the HF models are counted in
test_match_glu.py, which runs the pattern-matcher stage in pipeline order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from autodeploy.models.tiny import tiny_model
from autodeploy.transforms.graph import find_nodes, node_val
from transform_harness import check_transforms

aten = torch.ops.aten
NORM = torch.ops.autodeploy.torch_rmsnorm.default
ROPE = torch.ops.autodeploy.torch_rope.default
NORM_OPS = [aten.rsqrt.default, aten.pow.Tensor_Scalar]


def _norm_args(gm) -> list[tuple]:
    """(eps, weight_offset, out_dtype) of each torch_rmsnorm, defaults filled in."""
    defaults = (None, None, None, 0.0, None)
    return [(tuple(n.args) + defaults[len(n.args) :])[2:] for n in find_nodes(gm, NORM)]


@pytest.mark.parametrize(
    "model_type, per_layer, offset", [("llama", 2, 0.0), ("qwen3", 4, 0.0), ("gemma2", 4, 1.0)]
)
def test_bfloat16_norms_and_rope_are_matched(model_type, per_layer, offset):
    model = tiny_model(model_type, dtype=torch.bfloat16)
    layers = model.config.num_hidden_layers
    present = {NORM: per_layer * layers + 1, ROPE: 2 * layers, aten.to.dtype: 3}  # to: the rotary prologue's
    gm, history = check_transforms(
        model, ["cleanup_noop_ops", "match_rope", "match_rmsnorm"], present, NORM_OPS, atol=3e-2, rtol=3e-2
    )
    info = history["match_rmsnorm"]
    assert info.num_matches == per_layer * layers + 1 and "rejected" not in info.details
    eps = model.config.rms_norm_eps
    assert set(_norm_args(gm)) == {(eps, offset, None)}
    assert {node_val(n).dtype for n in find_nodes(gm, NORM)} == {torch.bfloat16}
    assert history["match_rope"].num_matches == 2 * layers


class NormLM(nn.Module):
    """One RMSNorm per form, each with its own eps, on a bfloat16 residual stream (odd hidden size 20)."""

    FORMS = ("weight_cast_right", "cast_weight_left", "cast_weight_right", "offset_to", "float32_weight")

    def __init__(self, hidden: int = 20, vocab: int = 83):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, num_hidden_layers=len(self.FORMS))
        self.embed = nn.Embedding(vocab, hidden)
        self.weights = nn.ParameterList(nn.Parameter(1.0 + 0.1 * torch.randn(hidden)) for _ in self.FORMS)
        self.linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in self.FORMS)
        self.head = nn.Linear(hidden, vocab)
        self.eps = [1e-5 * (i + 1) for i in range(len(self.FORMS))]

    def to_bfloat16(self) -> NormLM:
        self.to(torch.bfloat16)
        self.weights[-1].data = self.weights[-1].data.float()  # a float32 weight on bfloat16 activations
        return self

    def _norm(self, form: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if form == "weight_cast_right":
            return xhat.to(x.dtype) * weight
        if form == "cast_weight_left":
            return (weight * xhat).to(x.dtype)
        if form == "cast_weight_right":
            return (xhat * weight).to(x.dtype)
        if form == "offset_to":
            return (xhat * (1.0 + weight.float())).to(x.dtype)
        return weight * xhat.to(x.dtype)  # float32 out

    def forward(self, input_ids, position_ids=None, use_cache=False):
        x = self.embed(input_ids)
        for form, weight, eps, linear in zip(self.FORMS, self.weights, self.eps, self.linears):
            x = x + linear(self._norm(form, x, weight, eps).to(x.dtype))
        return SimpleNamespace(logits=self.head(x))


def test_hand_written_forms_with_their_own_eps():
    torch.manual_seed(0)
    model = NormLM().to_bfloat16()
    gm, history = check_transforms(
        model, ["cleanup_noop_ops", "match_rmsnorm"], {NORM: 5}, NORM_OPS, atol=3e-2, rtol=3e-2
    )
    assert history["match_rmsnorm"].num_matches == 5
    offsets = [1.0 if form == "offset_to" else 0.0 for form in NormLM.FORMS]
    out_dtypes = [torch.float32 if form == "float32_weight" else None for form in NormLM.FORMS]
    assert _norm_args(gm) == list(zip(model.eps, offsets, out_dtypes))


def test_norm_without_upcast_is_matched_in_float32_form():
    """A bfloat16 norm computed without casts matches the float32 form; the op then normalises in float32."""

    class Plain(NormLM):
        FORMS = ("plain",)

        def _norm(self, form, x, weight, eps):
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    torch.manual_seed(0)
    model = Plain().to(torch.bfloat16)
    gm, _ = check_transforms(
        model, ["cleanup_noop_ops", "match_rmsnorm"], {NORM: 1}, NORM_OPS, atol=3e-2, rtol=3e-2
    )
    assert _norm_args(gm) == [(1e-5, 0.0, None)]
