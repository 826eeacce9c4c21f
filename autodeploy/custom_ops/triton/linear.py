"""``autodeploy::triton_linear(x, weight, bias)``: ``aten.linear`` of 16-bit weights, with the GEMV at one token.

At one token (batch-1 decode) the weight-streaming GEMV of ``gemv.py`` reads a Llama-3.1-8B layer's four linears
in 161.6 us where cuBLAS takes 169.4 us (H100, ``bench/gemv.py``). From two tokens cuBLAS is ahead, so every
other call is ``F.linear``. Semantics are ``aten.linear``'s: float32 accumulation, the output in ``x``'s dtype.
``GEMV_LINEAR_MAX_TOKENS`` is the number of tokens up to which the GEMV runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import INTERPRET
from .gemv import W_DENSE, gemv

GEMV_LINEAR_MAX_TOKENS = 1


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return (
        0 < rows <= GEMV_LINEAR_MAX_TOKENS
        and (x.is_cuda or INTERPRET)
        and x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and weight.dim() == 2
        and weight.stride(-1) == 1
    )


def dense_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[M, K]`` rows (unit last stride) -> ``[M, N]``: the GEMV where it applies, else ``F.linear``."""
    if gemv_applies(x2, weight, x2.shape[0]):
        return gemv(x2, W_DENSE, weight, bias=bias)
    return F.linear(x2, weight, bias)


@torch.library.custom_op("autodeploy::triton_linear", mutates_args=())
def triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not gemv_applies(x, weight, rows):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return gemv(x2, W_DENSE, weight, bias=bias).view(*x.shape[:-1], weight.shape[0])


@triton_linear.register_fake
def _triton_linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
