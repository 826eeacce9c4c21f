"""match_rope through the shared harness: NeoX and interleaved RoPE of HF models (full, partial, Phi-3's empty
pass-through, gpt-oss's half-width cos), float32-upcast forms in bfloat16, ``[B, S, N, D]`` queries with
``cos.unsqueeze(2)``, and a ``cos`` shared over the batch that must be left alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from autodeploy.models.tiny import tiny_model
from autodeploy.patterns.rope import rotate_neox
from autodeploy.transforms.graph import find_nodes, is_op, node_val
from transform_harness import check_transforms

aten = torch.ops.aten
ROPE = torch.ops.autodeploy.torch_rope.default
TRANSFORMS = ["cleanup_noop_ops", "match_rope"]
ROTATION_OPS = [aten.neg.default, aten.stack.default]

# model type -> (config overrides, interleaved, rotated channels / head_dim, transposes left in the graph per layer);
# qwen3, gemma2 and mixtral write RoPE as llama does (their counts are checked in test_match_glu.py)
MODELS = {
    "llama": ({}, False, 1.0, 0),
    "phi3": ({}, False, 1.0, 0),  # partial_rotary with R == D: cat with an empty pass-through
    "phi": ({}, False, 0.5, 0),
    "stablelm": ({}, False, 0.25, 0),
    "gpt_neox": (
        {},
        False,
        0.25,
        4,
    ),  # q, k, v come from one chunk of a transposed qkv: those transposes stay
    "cohere": ({}, True, 1.0, 0),
    "gptj": ({"rotary_dim": 8}, True, 0.5, 1),  # [B, S, N, D] and attention written by hand (k.transpose)
    "gpt_oss": (
        {},
        False,
        1.0,
        2,
    ),  # chunk(2) halves, half-width cos; the routed experts' weights are transposed
}


def _check_ropes(gm, num_layers: int, interleaved: bool, rotated: int, dtype: torch.dtype) -> None:
    ropes = find_nodes(gm, ROPE)
    assert len(ropes) == 2 * num_layers
    for node in ropes:
        x, cos = node_val(node.args[0]), node_val(node.args[1])
        assert x.dtype == dtype and cos.dim() == 3 and cos.shape[-1] == rotated
        assert (node.args[3] if len(node.args) > 3 else False) is interleaved
        assert not any(is_op(user, [aten.to.dtype, aten._to_copy.default]) for user in node.users)


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_hf_rope_is_matched(model_type):
    overrides, interleaved, fraction, transposes = MODELS[model_type]
    model = tiny_model(model_type, **overrides)
    layers = model.config.num_hidden_layers
    # the prologue's one transpose (inv_freq @ positions) stays; the ones around q/k cancel against ours
    prologue = 0 if model_type == "gptj" else 1
    present = {ROPE: 2 * layers, aten.transpose.int: prologue + transposes * layers}
    gm, history = check_transforms(model, TRANSFORMS, present, ROTATION_OPS)
    info = history["match_rope"]
    assert info.num_matches == 2 * layers
    assert "unmatched" not in info.details and "rejected" not in info.details, info.details
    group = "rope_interleaved" if interleaved else "rope_neox"
    assert info.details["matches_by_pattern"] == {group: 2 * layers}
    head_dim = node_val(find_nodes(gm, ROPE)[0].args[0]).shape[-1]
    _check_ropes(gm, layers, interleaved, int(head_dim * fraction), torch.float32)


def test_gpt2_has_no_rope():
    _, history = check_transforms(tiny_model("gpt2"), TRANSFORMS, {ROPE: 0})
    assert history["match_rope"].num_matches == 0 and "unmatched" not in history["match_rope"].details


def test_bfloat16_upcast_rope_is_one_op():
    """Cohere upcasts q to float32, rotates with bfloat16 cos/sin and casts back: one op on the bfloat16 q, with the
    float32 math kept (cos/sin cast up). Llama's bfloat16 RoPE is in test_match_rmsnorm.py."""
    model = tiny_model("cohere", dtype=torch.bfloat16)
    layers = model.config.num_hidden_layers
    gm, history = check_transforms(model, TRANSFORMS, {ROPE: 2 * layers}, ROTATION_OPS, atol=2e-2, rtol=2e-2)
    assert history["match_rope"].num_matches == 2 * layers
    _check_ropes(gm, layers, True, 16, torch.bfloat16)
    assert {node_val(n.args[1]).dtype for n in find_nodes(gm, ROPE)} == {torch.float32}


class RopeLM(nn.Module):
    """q/k in ``[B, S, N, D]`` rotated with ``cos.unsqueeze(2)`` (odd sizes: 5 heads of 6), in one of two forms:
    ``upcast`` (NeoX in float32, cast back) or ``shared`` (``cos`` computed once for the whole batch)."""

    def __init__(self, form: str, heads: int = 5, head_dim: int = 6, hidden: int = 30, vocab: int = 83):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, num_hidden_layers=2)
        self.form, self.heads, self.head_dim = form, heads, head_dim
        self.embed = nn.Embedding(vocab, hidden)
        self.qk = nn.ModuleList(nn.Linear(hidden, 2 * heads * head_dim) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(heads * head_dim, hidden) for _ in range(2))
        self.head = nn.Linear(hidden, vocab)
        self.register_buffer("inv_freq", 1.0 / 1000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def _rope(self, x, cos, sin):  # x [B, S, N, D], cos [B or 1, S, D]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        half = x.shape[-1] // 2
        if self.form == "upcast":
            xf = x.float()
            return (xf * cos + rotate_neox(xf, half) * sin).to(x.dtype)
        return x * cos + rotate_neox(x, half) * sin

    def forward(self, input_ids, position_ids=None, use_cache=False):
        x = self.embed(input_ids)
        b, s, _ = x.shape
        pos = position_ids if self.form != "shared" else position_ids[:1]
        freqs = pos[..., None].float() * self.inv_freq  # [B or 1, S, D / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.form != "upcast":
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for qk, out in zip(self.qk, self.out):
            q, k = qk(x).view(b, s, 2 * self.heads, self.head_dim).chunk(2, dim=2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            x = x + out((q * k.flip(1)).reshape(b, s, -1))
        return SimpleNamespace(logits=self.head(x))


def test_bsnd_upcast_rope_with_unsqueeze_at_dim_2():
    """(GPT-J covers ``[B, S, N, D]`` in the input's dtype.)"""
    torch.manual_seed(0)
    model = RopeLM("upcast").to(torch.bfloat16)
    present = {ROPE: 4, aten.transpose.int: 0, aten.unsqueeze.default: 1}  # position_ids[..., None]
    gm, history = check_transforms(model, TRANSFORMS, present, ROTATION_OPS, atol=2e-2, rtol=2e-2)
    assert history["match_rope"].num_matches == 4
    _check_ropes(gm, 2, False, 6, torch.bfloat16)


def test_cos_shared_over_the_batch_is_left_alone():
    torch.manual_seed(0)
    _, history = check_transforms(RopeLM("shared"), TRANSFORMS, {ROPE: 0, aten.neg.default: 4})
    info = history["match_rope"]
    assert info.num_matches == 0
    reasons = list(info.details["rejected"].values())
    assert len(reasons) == 4 and all("not [B, S, R]" in r for r in reasons), reasons
    assert len(info.details["unmatched"]) == 4
