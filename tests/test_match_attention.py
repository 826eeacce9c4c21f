"""match_attention through the shared harness: SDPA and eager attention of HF models exported without our
attention interface, gpt-oss sinks, BLOOM's ALiBi, hand-written forms (odd head sizes), and masks that must not
be replaced."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from autodeploy.models.tiny import tiny_model
from autodeploy.transforms.graph import find_nodes, node_val
from transform_harness import check_transforms

aten = torch.ops.aten
ATTENTION = torch.ops.autodeploy.torch_attention.default
TRANSFORMS = ["cleanup_noop_ops", "match_attention"]
NO_ROUTING = ["route_attention"]
GONE = [aten.scaled_dot_product_attention.default, aten.bmm.default, aten.baddbmm.default]
#: softmaxes that are not attention (MoE routers), per layer
ROUTER_SOFTMAX = {"mixtral": 1, "gpt_oss": 1}


def _attention_args(gm) -> list[tuple]:
    """(scale, sliding_window, logit_cap, sinks, alibi_slopes) of each torch_attention, defaults filled in."""
    out = []
    for node in find_nodes(gm, ATTENTION):
        args = tuple(node.args) + (None,) * (8 - len(node.args))
        out.append(args[3:])
    return out


def _check_model(model, num_layers: int, softmax_per_layer: int = 0, max_seq_len: int = 1 << 20):
    present = {ATTENTION: num_layers, aten.softmax.int: softmax_per_layer * num_layers}
    gm, history = check_transforms(
        model, TRANSFORMS, present, GONE, disabled_patches=NO_ROUTING, max_seq_len=max_seq_len
    )
    info = history["match_attention"]
    assert info.num_matches == num_layers
    assert "unmatched" not in info.details and "rejected" not in info.details, info.details
    return gm, info


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "phi3", "gpt2", "mixtral"])
def test_hf_attention_is_matched(model_type, impl):
    model = tiny_model(model_type)
    try:
        model.set_attn_implementation(impl)
    except ValueError as e:  # transformers >= 5.2x refuses SDPA for gemma2 (soft-capping)
        pytest.skip(f"transformers {transformers.__version__}: {str(e)[:120]}")
    config = model.config
    gm, info = _check_model(model, config.num_hidden_layers, ROUTER_SOFTMAX.get(model_type, 0))
    group = "attention_sdpa" if impl == "sdpa" else "attention_eager"
    assert info.details["matches_by_pattern"] == {group: config.num_hidden_layers}

    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for node in find_nodes(gm, ATTENTION):  # repeat_kv folded: K/V keep their own head count
        assert node_val(node.args[1]).shape[2] == kv_heads
    if model_type == "gemma2":  # layer 0 slides over 8 keys (the prompts are 13 long); eager soft-caps
        cap = config.attn_logit_softcapping if impl == "eager" else None
        windows = [(args[1], args[2]) for args in _attention_args(gm)]
        assert sorted(windows, key=str) == sorted([(config.sliding_window, cap), (None, cap)], key=str)


def test_gpt_oss_sinks_are_matched():
    model = tiny_model("gpt_oss")
    model.set_attn_implementation("eager")
    gm, info = _check_model(model, model.config.num_hidden_layers, ROUTER_SOFTMAX["gpt_oss"])
    assert info.details["matches_by_pattern"] == {"attention_sinks": model.config.num_hidden_layers}
    sinks = [args[3].target for args in _attention_args(gm)]
    assert sorted(sinks) == [f"model.layers.{i}.self_attn.sinks" for i in range(model.config.num_hidden_layers)]


def test_bloom_alibi_is_matched():
    model = tiny_model("bloom")
    assert not model._can_set_attn_implementation()  # writes its attention by hand
    gm, info = _check_model(model, model.config.num_hidden_layers)
    assert info.details["matches_by_pattern"] == {"attention_alibi": model.config.num_hidden_layers}
    (slopes,) = {args[4].target for args in _attention_args(gm)}
    expected = torch.tensor([2.0 ** (-8 * (h + 1) / model.config.n_head) for h in range(model.config.n_head)])
    torch.testing.assert_close(getattr(gm, slopes), expected)


def test_mpt_eager_alibi_is_matched():
    """MPT adds its ALiBi bias to the scaled scores, then masked_fill: the eager form with a bias."""
    model = tiny_model("mpt")
    layers = model.config.n_layers
    gm, info = _check_model(model, layers, max_seq_len=model.config.max_seq_len)  # its ALiBi table bounds it
    assert info.details["matches_by_pattern"] == {"attention_alibi": layers}
    heads = model.config.n_heads
    expected = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)])  # MPT's alibi_bias_max = 8
    for slopes in {args[4].target for args in _attention_args(gm)}:  # each layer slices the table anew
        torch.testing.assert_close(getattr(gm, slopes), expected)


@pytest.mark.parametrize(
    "model_type, position, size",
    [("llama4_text", 5, 8), ("gemma3_text", 1, 8), ("cohere2", 1, 8)],  # chunk_size / sliding_window
)
def test_routed_masks_are_folded(model_type, position, size):
    """Routed attention carries the model's own mask; match_attention evaluates it and keeps a window or chunks.

    The tiny models keep one layer of each kind (chunked/sliding and full); their masks are never looked up by the
    layer's name, and the numbers are checked on prompts longer than the window or chunk."""
    model = tiny_model(model_type)
    layers = model.config.num_hidden_layers
    gm, history = check_transforms(model, TRANSFORMS, {ATTENTION: layers})
    info = history["match_attention"]
    assert info.details["masks_folded"] == layers and "rejected" not in info.details
    local = [args[position] if len(args) > position else None for args in _attention_args(gm)]
    kinds = model.config.layer_types
    assert local == [None if kind == "full_attention" else size for kind in kinds]
    assert all(len(node.args) <= 9 for node in find_nodes(gm, ATTENTION))  # no mask left for the cache


class HandWrittenLM(nn.Module):
    """A causal LM that writes its attention by hand: one ``form`` per test, odd sizes (7-wide heads, 6 q heads
    over 2 kv heads, 101 tokens). Masks are built from ``arange`` and ``input_ids``, never from the model's name."""

    def __init__(self, form: str, heads: int = 6, kv_heads: int = 2, head_dim: int = 7, hidden: int = 22):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=101, num_hidden_layers=2)
        self.form, self.heads, self.kv_heads, self.head_dim = form, heads, kv_heads, head_dim
        self.embed = nn.Embedding(101, hidden)
        qkv_size = (heads + 2 * kv_heads) * head_dim
        self.qkv = nn.ModuleList(nn.Linear(hidden, qkv_size) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(heads * head_dim, hidden) for _ in range(2))
        self.head = nn.Linear(hidden, 101)

    def _keep(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B or 1, 1, S, S] bool, True = attend
        s = input_ids.shape[1]
        i = torch.arange(s, device=input_ids.device)[:, None]
        j = torch.arange(s, device=input_ids.device)[None, :]
        keep = j <= i
        if self.form == "window":
            keep = keep & (i - j < 3)
        elif self.form == "chunked":
            keep = keep & (i // 4 == j // 4)
        elif self.form == "padding":
            return keep & (input_ids != 0)[:, None, None, :]
        elif self.form == "scrambled":
            keep = (i * 7 + j * 3) % 5 != 0
        return keep[None, None]

    def _attend(self, q, k, v, input_ids):  # q [B, H, S, D], k/v [B, KV, S, D] -> [B, H, S, D]
        rep = self.heads // self.kv_heads
        if self.form == "is_causal":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.form == "bidirectional":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        if self.form != "window":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._keep(input_ids), scale=0.3, enable_gqa=True)
        b, _, s, d = k.shape  # eager: repeat_kv, divide by sqrt(d), masked_fill, plain softmax
        k = k[:, :, None].expand(b, self.kv_heads, rep, s, d).reshape(b, self.heads, s, d)
        v = v[:, :, None].expand(b, self.kv_heads, rep, s, d).reshape(b, self.heads, s, d)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        scores = scores.masked_fill(~self._keep(input_ids), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def forward(self, input_ids, position_ids=None, use_cache=False):
        x = self.embed(input_ids)
        b, s, _ = x.shape
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).split(sizes, dim=-1)
            q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            a = self._attend(q, k, v, input_ids)
            x = x + out(a.transpose(1, 2).reshape(b, s, -1))
        return SimpleNamespace(logits=self.head(x))


@pytest.mark.parametrize(
    "form, group, scale, window",
    [
        ("causal", "attention_sdpa", 0.3, None),  # SDPA, bool mask, explicit scale, enable_gqa
        ("is_causal", "attention_sdpa", None, None),  # SDPA is_causal, default scale, repeat_interleave GQA
        ("window", "attention_eager", 1 / math.sqrt(7), 3),  # eager, div scale, masked_fill(-inf), repeat_kv
        ("chunked", "attention_sdpa", 0.3, None),  # SDPA, chunked local attention (chunks of 4)
    ],
)
def test_hand_written_attention_with_odd_sizes(form, group, scale, window):
    torch.manual_seed(0)
    gm, info = _check_model(HandWrittenLM(form), 2)
    assert info.details["matches_by_pattern"] == {group: 2}
    for node, args in zip(find_nodes(gm, ATTENTION), _attention_args(gm)):
        assert node_val(node.args[0]).shape[2:] == (6, 7) and node_val(node.args[1]).shape[2:] == (2, 7)
        assert args[1] == window
        assert args[0] == pytest.approx(scale) if scale is not None else args[0] is None
        assert (args[5] if len(args) > 5 else None) == (4 if form == "chunked" else None)


@pytest.mark.parametrize("form", ["padding", "scrambled"])
def test_non_causal_masks_are_left_alone(form):
    torch.manual_seed(0)
    sdpa = aten.scaled_dot_product_attention.default
    _, history = check_transforms(
        HandWrittenLM(form), TRANSFORMS, {ATTENTION: 0, sdpa: 2}, disabled_patches=NO_ROUTING
    )
    info = history["match_attention"]
    assert info.num_matches == 0
    reasons = list(info.details["rejected"].values())
    assert len(reasons) == 2 and all("not known to be causal" in r for r in reasons), reasons
    assert len(info.details["unmatched"]) == 2


def test_bidirectional_sdpa_is_left_alone():
    sdpa = aten.scaled_dot_product_attention.default
    _, history = check_transforms(
        HandWrittenLM("bidirectional"), TRANSFORMS, {ATTENTION: 0, sdpa: 2}, disabled_patches=NO_ROUTING
    )
    assert history["match_attention"].num_matches == 0
    assert len(history["match_attention"].details["unmatched"]) == 2


def test_matches_on_the_meta_device():
    """Big checkpoints are exported before their weights load; the harness needs values, so only counts here."""
    from transformers import AutoModelForCausalLM

    from autodeploy.config import ExportConfig
    from autodeploy.export import export_causal_lm
    from autodeploy.models.tiny import tiny_config
    from autodeploy.transforms import SharedContext, run_transforms
    from transform_harness import count_op, make_transforms

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.set_attn_implementation("eager")  # its additive mask reads a lifted 0.0 that has no value on meta
    gm = export_causal_lm(model, ExportConfig(disabled_patches=NO_ROUTING))
    gm = run_transforms(gm, make_transforms(TRANSFORMS), SharedContext())
    assert count_op(gm, ATTENTION) == model.config.num_hidden_layers
    assert count_op(gm, aten.softmax.int) == 0


def _mask_node(fn):
    """The output node of ``fn(input_ids, position_ids)`` traced by ``torch.fx``."""
    gm = torch.fx.symbolic_trace(fn)
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


@pytest.mark.parametrize(
    "fn, expected",
    [
        # chunks by index (transformers <= 5.1x) and by position ids (5.2x): the same where positions are indices
        (lambda input_ids, position_ids: (
            (torch.arange(position_ids.shape[1])[None, :] <= torch.arange(position_ids.shape[1])[:, None])
            & (torch.arange(position_ids.shape[1])[None, :] // 4 == torch.arange(position_ids.shape[1])[:, None] // 4)),
         4),
        (lambda input_ids, position_ids: (
            (position_ids[:, None, :] <= position_ids[:, :, None])
            & (position_ids[:, None, :] // 4 == position_ids[:, :, None] // 4)), 4),
        # chunks starting one position late: neither
        (lambda input_ids, position_ids: (
            (position_ids[:, None, :] <= position_ids[:, :, None])
            & ((position_ids[:, None, :] + 1) // 4 == (position_ids[:, :, None] + 1) // 4)), None),
    ],
    ids=["by_index", "by_position", "shifted"],
)
def test_chunked_masks_by_index_or_position(fn, expected):
    from autodeploy.patterns.attention_masks import CausalMask, classify_mask

    result = classify_mask(_mask_node(fn), "sdpa")
    if expected is None:
        assert isinstance(result, str) and "not causal" in result
    else:
        assert result == CausalMask(None, expected)
