"""Canonical rotary position embedding: ``autodeploy::torch_rope``.

``x [B, S, N, D]``, ``cos``/``sin`` ``[B, S, R]`` with ``R <= D`` (partial rotary when smaller): the first ``R``
channels are rotated, the rest pass through. ``cos``/``sin`` are given exactly as the model multiplies them
(already duplicated for the half-split form, repeat-interleaved for the interleaved form), so the op is
``x_r * cos + rotate(x_r) * sin`` where ``rotate`` is

- NeoX half-split (Llama): ``cat(-x[..., R/2:], x[..., :R/2])``;
- GPT-J interleaved: pairs ``(x0, x1) -> (-x1, x0)``.

The math runs in the dtype of ``cos`` (models compute RoPE in float32 or in the activation dtype) and the
result is cast back to ``x.dtype``.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, R]
    compute_dtype = torch.promote_types(x.dtype, cos.dtype)
    x_rot = x[..., :r].to(compute_dtype)
    rotated = rotate_interleaved(x_rot) if interleaved else rotate_half(x_rot)
    out = (x_rot * cos + rotated * sin).to(x.dtype)
    if r == x.shape[-1]:
        return out
    return torch.cat([out, x[..., r:]], dim=-1)


@torch.library.custom_op("autodeploy::torch_rope", mutates_args=())
def torch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    return rope_reference(x, cos, sin, interleaved)


@torch_rope.register_fake
def _torch_rope_fake(x, cos, sin, interleaved=False):
    return torch.empty_like(x)
