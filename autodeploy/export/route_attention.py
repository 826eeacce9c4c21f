"""Route every Hugging Face attention call to ``autodeploy::torch_attention`` while exporting.

transformers dispatches attention through ``AttentionInterface`` (``config._attn_implementation``) and builds
masks through ``AttentionMaskInterface``. We register one function under ``AUTODEPLOY_ATTENTION`` for each. The
mask function builds the model's own boolean mask (transformers' ``sdpa_mask``: whatever mask function the model
asked for — causal, sliding window, chunked, ...) and the attention function hands it to the canonical op, which
appears in the exported graph as one node per layer. The mask is not trusted by its name: ``match_attention``
evaluates the subgraph that computes it (``patterns/attention_masks.py``) and folds it into the op's
``sliding_window`` / ``chunk_size``, or says why it cannot. Models that write attention by hand don't call the
interface; the ``match_attention`` patterns catch those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.masking_utils import sdpa_mask

from .. import custom_ops  # noqa: F401  (registers the ops)
from ..errors import NotDecoderOnlyTextError, UnsupportedArchitectureError

AUTODEPLOY_ATTENTION = "autodeploy"


def autodeploy_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Nq, S, D]
    key: torch.Tensor,  # [B, Nkv, S, D]
    value: torch.Tensor,  # [B, Nkv, S, Dv]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise NotDecoderOnlyTextError(
            f"{type(module).__name__} uses bidirectional (non-causal) attention",
            hint="autodeploy runs decoder-only causal language models",
        )
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} passes a {type(attention_mask).__name__} as its attention mask",
            hint="report the model; autodeploy understands masks given as tensors",
        )
    # the model's mask, when it built one, decides the window (as in transformers' eager and SDPA paths)
    sliding_window = kwargs.get("sliding_window") if attention_mask is None else None
    extra: tuple[object, ...] = () if attention_mask is None else (None, attention_mask)  # chunk_size, mask
    out = torch.ops.autodeploy.torch_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        scaling,
        int(sliding_window) if sliding_window else None,
        kwargs.get("softcap"),
        kwargs.get("s_aux"),
        None,
        *extra,
    )  # [B, S, Nq, Dv]
    return out, None


def model_mask(**kwargs) -> torch.Tensor | None:
    """The model's mask as a ``[B, 1, Q, K]`` bool tensor, always materialised (never skipped as "just causal")."""
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


AttentionInterface.register(AUTODEPLOY_ATTENTION, autodeploy_attention)
AttentionMaskInterface.register(AUTODEPLOY_ATTENTION, model_mask)


def uses_attention_interface(model: torch.nn.Module) -> bool:
    return isinstance(model, PreTrainedModel) and model._can_set_attn_implementation()


@contextlib.contextmanager
def route_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Within the context, the model's attention calls ``torch_attention``. Yields whether routing applied."""
    if not uses_attention_interface(model):
        yield False
        return
    previous = model.config._attn_implementation
    model.set_attn_implementation(AUTODEPLOY_ATTENTION)
    try:
        yield True
    finally:
        model.set_attn_implementation(previous)
