"""``autodeploy::triton_add_rmsnorm_linear``: a residual add + RMSNorm and the linear that reads its output, as one op.

``(x, residual, norm_weight, eps, weight_offset, weight, bias, glu_activation) -> (y, normed, summed)`` where
``normed, summed = triton_fused_add_rmsnorm(x, residual, norm_weight, eps, weight_offset)`` and ``y`` is
``triton_linear(normed, weight, bias)``, or ``triton_linear_glu``'s dense form when ``glu_activation`` is set.
At one token (batch-1 decode) the GEMV normalises the row in its prologue (``gemv.AddRmsNorm``): one launch
instead of two, the same values. At other token counts it is the two ops.
"""

from __future__ import annotations

import torch

from .gemv import NORM_MAX_K, W_DENSE, AddRmsNorm, gemv
from .linear import gemv_applies, triton_linear
from .linear_glu import triton_linear_glu
from .rmsnorm import rmsnorm_launch


def _one_row(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    return (
        gemv_applies(x.reshape(rows, k), weight, rows)
        and residual.dtype == x.dtype
        and residual.shape == x.shape
        and k <= NORM_MAX_K
        and x.is_contiguous()
        and residual.is_contiguous()
    )


@torch.library.custom_op("autodeploy::triton_add_rmsnorm_linear", mutates_args=())
def triton_add_rmsnorm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    glu_activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    normed = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    k = x.shape[-1]
    if _one_row(x, residual, weight):
        w = norm_weight if norm_weight.stride(-1) == 1 else norm_weight.contiguous()
        norm = AddRmsNorm(residual.view(1, k), w, eps, weight_offset, normed.view(1, k), summed.view(1, k))
        y = gemv(x.view(1, k), W_DENSE, weight, bias=bias, glu_activation=glu_activation, norm=norm)
        return y.view(*x.shape[:-1], y.shape[-1]), normed, summed
    rmsnorm_launch(x, norm_weight, eps, weight_offset, normed, residual=residual, summed=summed)
    if glu_activation is None:
        return triton_linear(normed, weight, bias), normed, summed
    return triton_linear_glu(normed, weight, None, None, bias, "dense", 0, glu_activation), normed, summed


@triton_add_rmsnorm_linear.register_fake
def _fake(x, residual, norm_weight, eps, weight_offset, weight, bias=None, glu_activation=None):
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    n = weight.shape[0] // (2 if glu_activation is not None else 1)
    like = x.new_empty(x.shape, dtype=sum_dtype)
    return x.new_empty((*x.shape[:-1], n)), like, like.clone()
