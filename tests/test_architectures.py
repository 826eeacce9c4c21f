"""What the factory refuses before export (by structure), and the generic rules of the tiny configs."""

from __future__ import annotations

import pytest
import torch

from autodeploy.errors import NotDecoderOnlyTextError, UnsupportedArchitectureError
from autodeploy.models import ModelFactory
from autodeploy.models.architecture import check_config, check_layer_kinds, check_modules
from autodeploy.models.tiny import tiny_config, tiny_model


def _factory_refuses(model_type: str, error: type[Exception], on_meta: bool = True) -> str:
    """``ModelFactory.build_model`` (the factory stage, before export) raises ``error``; returns its message."""
    if on_meta:  # refused from the config before the module is touched: it needs no weights
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    else:
        model = tiny_model(model_type)
    with pytest.raises(error) as info:
        ModelFactory(model, device="cpu").build_model()
    return info.value.what


@pytest.mark.parametrize(
    "model_type, missing",
    [
        ("mamba", "recurrent state"),  # transformers marks it stateful
        ("jamba", "recurrent state"),
        ("falcon_h1", "recurrent state"),
        ("minimax", "'linear_attention' layers"),  # per-layer kinds in the config
        ("recurrent_gemma", "recurrent state"),
    ],
)
def test_recurrent_and_state_space_models_fail_in_the_factory(model_type, missing):
    what = _factory_refuses(model_type, UnsupportedArchitectureError)
    assert missing in what and "missing" in what


def test_layer_kinds_name_what_is_missing():
    config = tiny_config("llama")
    config.layer_types = ["full_attention", "conv"]
    with pytest.raises(UnsupportedArchitectureError) as info:
        check_layer_kinds(config)
    assert "'conv' layers (layer 1)" in info.value.what and "convolution-state cache" in info.value.what
    config.layer_types = ["full_attention", "sliding_attention"]
    check_layer_kinds(config)  # attention kinds pass


def test_depthwise_sequence_convolution_is_refused():
    model = tiny_model("llama")
    model.model.layers[0].mixer = torch.nn.Conv1d(64, 64, kernel_size=4, groups=64, padding=3)
    with pytest.raises(UnsupportedArchitectureError) as info:
        check_modules(model)
    assert "model.layers.0.mixer" in info.value.what


@pytest.mark.parametrize(
    "model_type, why",
    [("bart", "encoder-decoder"), ("gemma3", "vision_config"), ("whisper", "encoder-decoder")],
)
def test_encoder_decoder_and_multimodal_configs_are_not_decoder_only_text(model_type, why):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with pytest.raises(NotDecoderOnlyTextError) as info:
        check_config(CONFIG_MAPPING[model_type]())
    assert why in info.value.what


def test_encoder_architectures_are_not_decoder_only_text():
    assert "encoder architecture" in _factory_refuses("bert", NotDecoderOnlyTextError)
    model = tiny_model("llama")
    model.model.layers[1].self_attn.is_causal = False  # bidirectional attention, whatever the config says
    with pytest.raises(NotDecoderOnlyTextError) as info:
        ModelFactory(model, device="cpu").build_model()
    assert "model.layers.1.self_attn" in info.value.what


def test_decoder_only_models_pass_the_checks():
    for model_type in ("llama", "gpt2", "deepseek_v3", "gpt_oss", "llama4_text"):
        config = tiny_config(model_type)
        check_config(config)
        check_modules(tiny_model(model_type))


# ----------------------------------------------------------------------------------------------- tiny configs


def test_tiny_keeps_one_layer_of_each_kind():
    config = tiny_config("gemma3_text")  # default: 5 sliding layers, then a full one
    assert sorted(set(config.layer_types)) == ["full_attention", "sliding_attention"]
    assert config.num_hidden_layers == len(config.layer_types)
    llama4 = tiny_config("llama4_text")  # chunked + RoPE layers and full + NoPE layers
    assert set(llama4.layer_types) == {"chunked_attention", "full_attention"}
    assert len(llama4.no_rope_layers) == llama4.num_hidden_layers


def test_tiny_latent_attention_is_consistent():
    config = tiny_config("deepseek_v3")
    assert config.num_key_value_heads == config.num_attention_heads  # MLA: one decompressed K/V head per head
    assert config.head_dim == config.qk_rope_head_dim
    assert 1 <= config.first_k_dense_replace < config.num_hidden_layers  # a dense layer and an MoE layer
    assert config.n_routed_experts % config.n_group == 0 and config.n_routed_experts // config.n_group >= 2
    assert config.topk_group <= config.n_group


def test_tiny_rotary_dim_shrinks_with_the_head():
    config = tiny_config("gptj")
    assert 2 <= config.rotary_dim <= config.n_embd // config.n_head
    assert tiny_config("gptj", rotary_dim=8).rotary_dim == 8  # overrides win


def test_tiny_read_only_fields_are_left_alone():
    config = tiny_config("falcon")  # head_dim is a property computed from hidden_size and heads
    assert config.head_dim == config.hidden_size // config.num_attention_heads


def test_tiny_shrinks_configs_with_per_layer_attributes():
    """gemma4_unified_text's ``head_dim`` exists only per layer: reading it globally raises, it still shrinks."""
    config = tiny_config("gemma4_unified_text")
    assert config.hidden_size == 64 and config.num_hidden_layers == len(config.layer_types) <= 4
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}


def test_experts_with_a_norm_on_each_output_are_refused():
    """transformers' ``has_post_expert_norm`` experts (a norm on each expert's output) are not ``torch_moe``'s."""
    from autodeploy.export.route_experts import experts_modules, route_experts

    model = tiny_model("qwen3_moe")
    experts_modules(model)[0].has_post_expert_norm = True
    with pytest.raises(UnsupportedArchitectureError) as info:
        with route_experts(model):
            pass
    assert "has_post_expert_norm" in info.value.what
