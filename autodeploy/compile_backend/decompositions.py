"""The torch reference ``autodeploy::`` ops written out in aten for Inductor, so it fuses through them.

A custom op is opaque to Inductor (an extern call between its generated kernels). The reference ops are plain
torch code, so Inductor gets them as decompositions and generates its own fused kernels; the fast (Triton) twins
stay opaque calls. Canonical attention becomes ``scaled_dot_product_attention`` (flash / memory-efficient
kernels) where that computes the same thing — causal over q and k of one length, no window, soft-cap, sinks or
ALiBi, chunks or model mask — and its reference otherwise. ``torch_moe`` (data-dependent routing) stays an op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..custom_ops.activation import apply_activation
from ..custom_ops.attention import attention_reference
from ..custom_ops.rmsnorm import fused_add_rmsnorm_reference, rmsnorm_reference
from ..custom_ops.rope import rope_reference

ops = torch.ops.autodeploy


def attention_decomposition(
    q: torch.Tensor,  # [B, S, Nq, D]
    k: torch.Tensor,  # [B, Sk, Nkv, D]
    v: torch.Tensor,  # [B, Sk, Nkv, Dv]
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, S, Nq, Dv]
    plain = sliding_window is None and not logit_cap and sinks is None and alibi_slopes is None
    plain = plain and chunk_size is None and mask is None
    if plain and statically_known_true(q.shape[1] == k.shape[1]):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )  # [B, Nq, S, Dv]
        return out.transpose(1, 2).contiguous()
    extra = {"chunk_size": chunk_size, "mask": mask}
    extra = {k: v for k, v in extra.items() if v is not None}  # trailing arguments newer than the others
    return attention_reference(q, k, v, scale, sliding_window, logit_cap, sinks, alibi_slopes, **extra)


def _rmsnorm(x, weight, eps, weight_offset=0.0, out_dtype=None):
    return rmsnorm_reference(x, weight, eps, weight_offset, out_dtype)


def _fused_add_rmsnorm(x, residual, weight, eps, weight_offset=0.0):
    return fused_add_rmsnorm_reference(x, residual, weight, eps, weight_offset)


def _rope(x, cos, sin, interleaved=False):
    return rope_reference(x, cos, sin, interleaved)


def _glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return apply_activation(activation, gate) * up


def _glu_packed(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return apply_activation(activation, gate) * up


def reference_decompositions() -> dict[Any, Callable[..., Any]]:
    """``{op overload: aten implementation}`` for every torch reference op that has one."""
    return {
        ops.torch_attention.default: attention_decomposition,
        ops.torch_rmsnorm.default: _rmsnorm,
        ops.torch_fused_add_rmsnorm.default: _fused_add_rmsnorm,
        ops.torch_rope.default: _rope,
        ops.torch_glu.default: _glu,
        ops.torch_glu_packed.default: _glu_packed,
    }
