"""Tiny random-weight configs built from each architecture's own config class (tests, coverage, examples).

``tiny_config("llama")`` takes transformers' default config for the model type and shrinks it. Nothing is
written out per architecture; the rules are per *field*, applied to whatever fields the class has:

1. **sizes**: every field of ``TINY_SIZES`` the class has (through its ``attribute_map`` aliases too) gets the
   tiny value; read-only properties and fields the class refuses to set are left alone;
2. **per-layer lists** (a list as long as the default ``num_hidden_layers``: ``layer_types``, ``mlp_layer_types``,
   ``no_rope_layers``, per-layer widths, ...): the tiny model keeps one layer of every distinct combination of
   per-layer values (at least ``MIN_LAYERS``), so a model with sliding and full layers keeps one of each;
   ``[[kinds], repeat]`` patterns have their repeat count cut to fit;
3. **layer counts** (an int field named ``*layer*`` or ``first_k_*`` between 1 and the number of layers:
   ``first_k_dense_replace``, ``num_kv_shared_layers``, ``max_window_layers``, ...) keep their place: all layers stay all layers, a few leading
   layers become one;
4. **consistency rules** between fields (``CONSISTENCY_RULES``): multi-head latent attention keeps one KV head per
   query head and its ``head_dim`` the rotary part; a ``rotary_dim`` shrinks with the head; expert groups still
   hold two experts each; a default-less top-k gets one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "max_seq_len": 512,
    "ffn_hidden_size": 128,
    # mixture of experts
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    # multi-head latent attention
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # sliding windows and chunked attention smaller than the test prompts
    "sliding_window": 8,
    "window_size": 8,
    "attention_chunk_size": 8,
    # per-layer inputs and low-rank side paths
    "hidden_size_per_layer_input": 16,
    "laurel_rank": 8,
}
#: fields set even where the default is ``None`` (a ``None`` there means "missing", not "off")
SET_WHEN_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok")
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MIN_LAYERS = 2
MAX_LAYERS = 4


def _canonical_names(config_cls: type[PretrainedConfig]) -> dict[str, str]:
    """Size-field name as this config class spells it (via ``attribute_map``) for each key of TINY_SIZES."""
    aliases = getattr(config_cls, "attribute_map", {}) or {}
    inverse = {canonical: alias for alias, canonical in aliases.items()}
    return {key: inverse.get(key, key) for key in TINY_SIZES}


def _read_only(config_cls: type, name: str) -> bool:
    attr = getattr(config_cls, name, None)
    return isinstance(attr, property) and attr.fset is None


def _get(config: PretrainedConfig, name: str) -> Any:
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001  (per-layer attributes of composite configs raise on global access)
        return None


def _has(config: PretrainedConfig, name: str) -> bool:
    """``hasattr`` that also holds for per-layer attributes, which raise on global access (not AttributeError)."""
    try:
        getattr(config, name)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001  (there, but only per layer)
        return True
    return True


def _sizes(default: PretrainedConfig) -> dict[str, Any]:
    config_cls = type(default)
    kwargs: dict[str, Any] = {}
    for key, name in _canonical_names(config_cls).items():
        if _read_only(config_cls, key) or _read_only(config_cls, name):
            continue
        value = _get(default, key)
        value = _get(default, name) if value is None else value
        present = _has(default, key) or _has(default, name) or name in default.to_dict()
        if value is None and not (key in SET_WHEN_NONE and present):
            continue
        if key in ("sliding_window", "window_size", "attention_chunk_size") and not value:
            continue
        kwargs[key] = TINY_SIZES[key]
    return kwargs


def _is_index_list(values: list[Any]) -> bool:
    """Layer *indices* (``moe_layers = [0, 1, 2, ...]``), not one value per layer: recomputed, not cut."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    return ints and all(b > a for a, b in zip(values, values[1:]))


def _per_layer_fields(default: PretrainedConfig, num_layers: int) -> dict[str, list[Any]]:
    fields = {}
    for name, value in default.to_dict().items():
        if name in ("architectures",) or not isinstance(value, list) or len(value) != num_layers or num_layers < 2:
            continue
        if not _is_index_list(value):
            fields[name] = value
    return fields


def _pick_layers(per_layer: dict[str, list[Any]], num_layers: int) -> list[int]:
    """Indices of the default layers the tiny model keeps: the first of every distinct per-layer combination."""
    first: dict[str, int] = {}
    for i in range(num_layers):
        first.setdefault(repr([values[i] for values in per_layer.values()]), i)
    picked = sorted(first.values())[:MAX_LAYERS]
    extra = [i for i in range(num_layers) if i not in picked]
    return sorted(picked + extra[: max(0, MIN_LAYERS - len(picked))])


def _repeat_patterns(default: PretrainedConfig, num_layers: int) -> dict[str, Any]:
    """``[[kinds, repeat], ...]`` fields (one pattern repeated): the repeat cut so the pattern fills the tiny model."""
    out = {}
    for name, value in default.to_dict().items():
        if not (isinstance(value, list) and value and all(isinstance(p, list) and len(p) == 2 for p in value)):
            continue
        if not all(isinstance(p[0], list) and isinstance(p[1], int) for p in value):
            continue
        per_repeat = sum(len(kinds) for kinds, _ in value)
        out[name] = [[kinds, max(1, num_layers // per_repeat)] for kinds, _ in value]
    return out


def _layer_counts(default: PretrainedConfig, default_layers: int, num_layers: int) -> dict[str, int]:
    out = {}
    for name, value in default.to_dict().items():
        counts_layers = "layer" in name or name.startswith("first_k_")  # first_k_dense_replace
        if not counts_layers or name == "num_hidden_layers" or isinstance(value, bool) or not isinstance(value, int):
            continue
        if not 1 <= value <= default_layers or default_layers <= 1:
            continue
        if value == default_layers:
            out[name] = num_layers
        else:
            out[name] = max(1, min(num_layers - 1, round(value * num_layers / default_layers)))
    return out


# ----------------------------------------------------------------------------------------------- consistency

Rule = Callable[[PretrainedConfig, dict[str, Any]], dict[str, Any]]


def _default_head_dim(default: PretrainedConfig) -> int | None:
    head_dim = _get(default, "head_dim")
    if isinstance(head_dim, int):
        return head_dim
    hidden, heads = _get(default, "hidden_size"), _get(default, "num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def _latent_attention(default: PretrainedConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Multi-head latent attention decompresses one K/V head per query head; its ``head_dim`` is the rotary part."""
    if _get(default, "kv_lora_rank") is None:
        return {}
    out: dict[str, Any] = {}
    if "num_key_value_heads" in kwargs:
        out["num_key_value_heads"] = TINY_SIZES["num_attention_heads"]
    rope = _get(default, "qk_rope_head_dim")
    if "head_dim" in kwargs and rope is not None and _get(default, "head_dim") == rope:
        out["head_dim"] = TINY_SIZES["qk_rope_head_dim"]
    return out


def _rotary_dim(default: PretrainedConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A rotary width given in channels keeps its share of the (shrunk) head."""
    rotary, head = _get(default, "rotary_dim"), _default_head_dim(default)
    if not isinstance(rotary, int) or not head or head <= 0:
        return {}
    tiny_head = kwargs.get("head_dim") or TINY_SIZES["hidden_size"] // TINY_SIZES["num_attention_heads"]
    return {"rotary_dim": max(2, 2 * round(rotary * tiny_head / head / 2))}


def _expert_groups(default: PretrainedConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Group-limited routing: every group keeps at least two experts, and the top groups scale with the groups."""
    groups, top = _get(default, "n_group"), _get(default, "topk_group")
    experts = next((kwargs[k] for k in ("n_routed_experts", "num_local_experts", "num_experts") if k in kwargs), None)
    if not isinstance(groups, int) or experts is None or groups <= 1:
        return {}
    tiny_groups = max(d for d in range(1, experts // 2 + 1) if experts % d == 0 and d <= groups)
    out: dict[str, Any] = {"n_group": tiny_groups}
    if isinstance(top, int):
        out["topk_group"] = max(1, min(tiny_groups, round(top * tiny_groups / groups)))
    return out


CONSISTENCY_RULES: list[Rule] = [_latent_attention, _rotary_dim, _expert_groups]


# ----------------------------------------------------------------------------------------------- building


def _build(model_type: str, kwargs: dict[str, Any]) -> PretrainedConfig:
    """The config with ``kwargs``; fields the class refuses to set (one at a time) are dropped."""
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception:
        refused = []
        for key in list(kwargs):
            try:
                AutoConfig.for_model(model_type, **{key: kwargs[key]})
            except Exception:  # noqa: BLE001
                refused.append(key)
        if not refused:
            raise
        return AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if k not in refused})


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    default = CONFIG_MAPPING[model_type]()
    kwargs = _sizes(default)
    default_layers = _get(default, "num_hidden_layers")
    if isinstance(default_layers, int) and "num_hidden_layers" in kwargs:
        per_layer = _per_layer_fields(default, default_layers)
        keep = _pick_layers(per_layer, default_layers) if per_layer else list(range(MIN_LAYERS))
        kwargs["num_hidden_layers"] = len(keep)
        for name, values in per_layer.items():
            tiny = kwargs.get(name)
            kwargs[name] = [tiny if tiny is not None and not isinstance(tiny, list) else values[i] for i in keep]
        kwargs.update(_repeat_patterns(default, len(keep)))
        kwargs.update(_layer_counts(default, default_layers, len(keep)))
    for rule in CONSISTENCY_RULES:
        kwargs.update(rule(default, kwargs))
    kwargs.update(TOKEN_IDS)
    kwargs.update(overrides)
    return _build(model_type, kwargs)


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any):
    """A random-weight causal LM of ``tiny_config(model_type)``, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
