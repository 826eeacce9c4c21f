"""Route every Hugging Face attention call to ``autodeploy::torch_attention`` while exporting.

transformers dispatches attention through ``AttentionInterface`` (``config._attn_implementation``) and builds
masks through ``AttentionMaskInterface``. We register one function under ``AUTODEPLOY_ATTENTION`` for each: the
mask function returns ``None`` (our op is causal by construction, so no mask is built or traced) and the
attention function calls the canonical op, which then appears in the exported graph as one node per layer.
Models that write attention by hand don't call the interface; the ``match_attention`` patterns catch those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel

from .. import custom_ops  # noqa: F401  (registers the ops)
from ..errors import UnsupportedArchitectureError

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
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} uses bidirectional (non-causal) attention",
            hint="autodeploy runs decoder-only causal language models",
        )
    if attention_mask is not None:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} passes an explicit attention mask that bypasses the mask interface",
            hint="report the model; a mask-form pattern is needed for it",
        )
    sliding_window = kwargs.get("sliding_window")
    out = torch.ops.autodeploy.torch_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        scaling,
        int(sliding_window) if sliding_window else None,
        kwargs.get("softcap"),
        kwargs.get("s_aux"),
        None,
    )  # [B, S, Nq, Dv]
    return out, None


def no_mask(*args, **kwargs) -> None:
    return None


AttentionInterface.register(AUTODEPLOY_ATTENTION, autodeploy_attention)
AttentionMaskInterface.register(AUTODEPLOY_ATTENTION, no_mask)


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
