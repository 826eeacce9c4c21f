"""Is this a decoder-only text transformer autodeploy can run? Decided from structure, before export.

Three questions, each answered from what the config and the modules *are*, never from a model's name:

1. **Decoder-only text?** An encoder-decoder config (``is_encoder_decoder``), a config with sub-configs of
   another modality or an encoder (``vision_config``, ``audio_config``, ``vq_config``, ``encoder_config``, ...), a
   model class whose forward takes images, audio or video (``pixel_values``, ``image_patches``, ``input_features``),
   an encoder architecture left as an encoder (its config can make it a decoder, ``is_decoder`` with
   ``add_cross_attention``, and does not), or a model with an attention module that is not causal
   (``is_causal = False``: bidirectional self-attention, or cross-attention) is not: ``NotDecoderOnlyTextError``.
2. **Only attention and feed-forward layers?** Per-layer kinds in the config (``layer_types``,
   ``layers_block_type``, ``block_types``, ... in transformers' layer-type vocabulary) other than full, sliding or
   chunked attention and dense/sparse/MoE feed-forward (``linear_attention``, ``conv``, ``hybrid``, ``recurrent``,
   sparse attention with a learned token indexer, compressed KV attention) need a cache or kernels autodeploy
   does not have.
3. **No recurrent state?** transformers marks models whose cache carries a recurrent state (``_is_stateful``),
   and a depthwise ``Conv1d`` over the sequence is a convolutional/state-space mixer.

(2) and (3) raise ``UnsupportedArchitectureError`` naming what is missing. The factory calls
``check_config`` before building the model and ``check_modules`` on the built model, both before export.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import NotDecoderOnlyTextError, UnsupportedArchitectureError

#: per-layer kinds (transformers' layer-type vocabulary) that are attention the canonical op covers, or no mixer
SUPPORTED_LAYER_KINDS = frozenset(
    {"full_attention", "sliding_attention", "chunked_attention", "attention", "global", "local"}
    | {"dense", "sparse", "moe", "mlp"}
)
#: what each unsupported kind needs, for the error message (kinds not listed are named as they are)
_MISSING = {
    "linear_attention": "a recurrent-state cache and linear-attention/state-space kernels",
    "mamba": "a recurrent-state cache and state-space kernels",
    "recurrent": "a recurrent-state cache and recurrence kernels",
    "conv": "a convolution-state cache for the short causal convolutions",
    "hybrid": "a recurrent-state cache beside the KV cache (attention and state-space in one layer)",
    "hybrid_sliding": "a recurrent-state cache beside the KV cache (attention and state-space in one layer)",
    "deepseek_sparse_attention": "sparse attention over the tokens a learned indexer selects (an indexer-key cache)",
    "qwen_sparse_attention": "sparse attention over the tokens a learned indexer selects (an indexer-key cache)",
    "minimax_m3_sparse": "sparse attention over the tokens a learned indexer selects (an indexer-key cache)",
    "compressed_sparse_attention": "attention over a compressed KV cache",
    "heavily_compressed_attention": "attention over a compressed KV cache",
}
#: sub-config names that mean another modality or an encoder
_NON_TEXT_PARTS = ("vision", "audio", "image", "video", "speech", "vq", "encoder", "patcher")
#: forward arguments that carry another modality
_NON_TEXT_INPUTS = ("pixel", "image", "audio", "video", "input_features")
_HINT = "autodeploy runs decoder-only text transformers (attention + MLP/MoE layers); see docs/COVERAGE.md"


def _kind_fields(config: Any) -> dict[str, list[str]]:
    """``{field: kinds}`` for every per-layer kind list of ``config`` (``*layer_types``, ``*block_type(s)``)."""
    found: dict[str, list[str]] = {}
    names = set(config.to_dict()) | {n for n in dir(type(config)) if isinstance(getattr(type(config), n, None), property)}
    for name in sorted(names):
        lowered = name.lower()
        if not (("layer" in lowered or "block" in lowered) and "type" in lowered) or lowered.startswith("mtp"):
            continue
        try:
            value = getattr(config, name)
        except Exception:  # noqa: BLE001  (a property that needs other fields)
            continue
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            found[name] = list(value)
    return found


def _non_text_parts(config: Any) -> list[str]:
    parts = list(getattr(config, "sub_configs", {}) or {})
    return [p for p in parts if any(word in p.lower() for word in _NON_TEXT_PARTS)]


def check_decoder_only_text(config: Any) -> None:
    """Raise ``NotDecoderOnlyTextError`` unless ``config`` (an instance, or only its class) is decoder-only text."""
    name = config.__name__ if isinstance(config, type) else type(config).__name__
    if not isinstance(config, type) and getattr(config, "is_encoder_decoder", False):
        raise NotDecoderOnlyTextError(
            f"{name} is an encoder-decoder model (its causal-LM class is the decoder half)", hint=_HINT
        )
    parts = _non_text_parts(config)
    if parts:
        raise NotDecoderOnlyTextError(f"{name} is multimodal or has an encoder (sub-configs: {', '.join(parts)})", hint=_HINT)
    if isinstance(config, type):
        return
    if getattr(config, "is_decoder", None) is False and hasattr(config, "add_cross_attention"):
        raise NotDecoderOnlyTextError(
            f"{name} is an encoder architecture with is_decoder=False (bidirectional attention; it becomes a decoder "
            "only as half of an encoder-decoder pair)",
            hint=_HINT,
        )


def check_layer_kinds(config: Any) -> None:
    """Raise ``UnsupportedArchitectureError`` if a per-layer kind of ``config`` is not attention or a feed-forward."""
    problems: list[str] = []
    for field, kinds in _kind_fields(config).items():
        for kind in dict.fromkeys(kinds):
            if kind in SUPPORTED_LAYER_KINDS:
                continue
            layers = [i for i, k in enumerate(kinds) if k == kind]
            missing = _MISSING.get(kind, "a kernel for this layer kind")
            problems.append(f"{field} has {kind!r} layers ({_layers(layers)}): missing {missing}")
    if problems:
        raise UnsupportedArchitectureError(f"{type(config).__name__}: " + "; ".join(problems), hint=_HINT)


def _non_text_inputs(model_cls: type) -> list[str]:
    try:
        params = inspect.signature(model_cls.forward).parameters
    except (TypeError, ValueError):
        return []
    return [p for p in params if any(word in p for word in _NON_TEXT_INPUTS)]


def check_model_class(model_cls: type | None, config: Any) -> None:
    """Raise if the model class takes other modalities, or transformers marks it as carrying a recurrent state."""
    inputs = _non_text_inputs(model_cls) if model_cls is not None else []
    if inputs:
        raise NotDecoderOnlyTextError(
            f"{model_cls.__name__} is multimodal: its forward takes {', '.join(inputs)}", hint=_HINT
        )
    if model_cls is not None and getattr(model_cls, "_is_stateful", False):
        raise UnsupportedArchitectureError(
            f"{model_cls.__name__} keeps a recurrent state in its cache (transformers marks it stateful): missing a "
            "recurrent-state cache and state-space/recurrence kernels; the paged KV cache holds attention keys and "
            "values only",
            hint=_HINT,
        )


def check_config(config: Any, model_cls: type | None = None) -> None:
    check_decoder_only_text(config)
    check_model_class(model_cls, config)
    check_layer_kinds(config)


def _depthwise_convs(model: torch.nn.Module) -> Iterable[str]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv1d) and module.groups > 1 and module.groups == module.in_channels:
            yield name


def check_modules(model: torch.nn.Module) -> None:
    """Raise if ``model`` has a non-causal attention module or a sequence mixer that carries state between steps."""
    not_causal = [name for name, module in model.named_modules() if getattr(module, "is_causal", True) is False]
    if not_causal:
        raise NotDecoderOnlyTextError(
            f"{type(model).__name__} has attention that is not causal ({_names(not_causal)}): bidirectional "
            "self-attention (an encoder) or cross-attention (the decoder of an encoder-decoder pair)",
            hint=_HINT,
        )
    convs = list(_depthwise_convs(model))
    if convs:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has depthwise causal convolutions over the sequence ({_names(convs)}): a convolutional "
            "or state-space mixer; missing a convolution-state cache and its kernels",
            hint=_HINT,
        )


def _layers(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:6]))
    return ("layer " if len(indices) == 1 else "layers ") + shown + (", ..." if len(indices) > 6 else "")


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
