"""Tiny random-weight configs built from each architecture's own config class (tests, coverage, examples).

``tiny_config("llama")`` takes transformers' default config for the model type and shrinks every size field
it has (through the class's ``attribute_map`` aliases too), so no architecture is written out by hand.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    # mixture of experts
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    # multi-head latent attention
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # sliding windows and chunked attention smaller than the test prompts
    "sliding_window": 8,
    "attention_chunk_size": 8,
}
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _canonical_names(config_cls: type[PretrainedConfig]) -> dict[str, str]:
    """Size-field name as this config class spells it (via ``attribute_map``) for each key of TINY_SIZES."""
    aliases = getattr(config_cls, "attribute_map", {}) or {}
    inverse = {canonical: alias for alias, canonical in aliases.items()}
    return {key: inverse.get(key, key) for key in TINY_SIZES}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    default = AutoConfig.for_model(model_type)
    kwargs: dict[str, Any] = {}
    for key, name in _canonical_names(type(default)).items():
        value = getattr(default, key, getattr(default, name, None))
        if value is None and key not in ("head_dim",):
            continue
        if key == "sliding_window" and not value:
            continue
        kwargs[key] = TINY_SIZES[key]
    kwargs.update(TOKEN_IDS)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    return config


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any):
    """A random-weight causal LM of ``tiny_config(model_type)``, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
