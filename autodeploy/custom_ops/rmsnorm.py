"""Canonical RMSNorm: ``autodeploy::torch_rmsnorm``.

``y = (x / sqrt(mean(x^2) + eps)) * (weight + weight_offset)``, normalised in float32. ``weight_offset`` is 1.0 for
the Gemma form ``x_hat * (1 + w)``. The output dtype is ``x.dtype`` (``out_dtype`` overrides it for models that
return the float32 product).

``autodeploy::torch_fused_add_rmsnorm(x, residual, weight, eps, weight_offset) -> (normed, x + residual)`` is the
pre-norm residual step (the sum rounded to its dtype, then normalised) that ``fusion`` swaps in for fast backends.
"""

from __future__ import annotations

import torch


def rmsnorm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + weight_offset if weight_offset else weight
    if weight_offset:
        return (normed * w).to(out_dtype or x.dtype)
    return (w * normed.to(x.dtype)).to(out_dtype or x.dtype)


@torch.library.custom_op("autodeploy::torch_rmsnorm", mutates_args=())
def torch_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    return rmsnorm_reference(x, weight, eps, weight_offset, out_dtype)


@torch_rmsnorm.register_fake
def _torch_rmsnorm_fake(x, weight, eps, weight_offset=0.0, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


def fused_add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(x + residual), x + residual)``: the sum is rounded to its dtype before it is normalised."""
    added = x + residual
    return rmsnorm_reference(added, weight, eps, weight_offset), added


@torch.library.custom_op("autodeploy::torch_fused_add_rmsnorm", mutates_args=())
def torch_fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_rmsnorm_reference(x, residual, weight, eps, weight_offset)


@torch_fused_add_rmsnorm.register_fake
def _torch_fused_add_rmsnorm_fake(x, residual, weight, eps, weight_offset=0.0):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype)
