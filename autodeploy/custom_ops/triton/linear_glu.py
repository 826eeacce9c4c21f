"""``autodeploy::triton_linear_glu``: a packed gate/up linear followed by its gated activation, as one op.

``(x, weight, scales, zeros, bias, weight_format, group_size, activation) -> act(gate) * up [..., N / 2]``, where
``gate, up`` are the two halves of the linear's ``[..., N]`` output. ``weight_format`` names the linear it
replaces, with that op's weight arguments: ``dense`` (``triton_linear``: scales and zeros None), ``fp8``
(``triton_quant_fp8_linear``: scales = weight_scale) and ``int4`` (``triton_quant_int4_linear``). The numerics
are those of the linear followed by ``triton_glu_packed``. At the token counts where the linear runs the decode
GEMV, the GEMV computes the activation in its epilogue (``gemv.py``), which saves the activation's launch of
every MLP; at other counts it is the two ops.
"""

from __future__ import annotations

import torch

from ._common import INTERPRET
from .gemv import W_DENSE, W_FP8, W_INT4, gemv
from .glu import glu_packed_launch
from .linear import dense_linear, gemv_applies
from .quant_linear import FP8_GEMV_MAX_TOKENS, _rows, fp8_linear, int4_gemv, int4_gemv_max_tokens, int4_linear

#: weight_format -> the GEMV's format code
WEIGHT_FORMATS: dict[str, int] = {"dense": W_DENSE, "fp8": W_FP8, "int4": W_INT4}


def gemv_glu_applies(x2: torch.Tensor, weight: torch.Tensor, weight_format: str, group_size: int) -> bool:
    """Whether the unfused linear would run the GEMV at this token count (the fused op then runs it with the
    activation in its epilogue)."""
    rows = x2.shape[0]
    if weight_format == "dense":
        return gemv_applies(x2, weight, rows)
    most = FP8_GEMV_MAX_TOKENS if weight_format == "fp8" else int4_gemv_max_tokens(x2, group_size)
    return 0 < rows <= most and (x2.is_cuda or INTERPRET)


def _linear(x2, weight, scales, zeros, bias, weight_format: str, group_size: int) -> torch.Tensor:
    if weight_format == "dense":
        return dense_linear(x2, weight, bias)
    if weight_format == "fp8":
        return fp8_linear(x2, weight, scales, bias)
    return int4_linear(x2, weight, scales, zeros, bias, group_size)


@torch.library.custom_op("autodeploy::triton_linear_glu", mutates_args=())
def triton_linear_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    weight_format: str,
    group_size: int,
    activation: str,
) -> torch.Tensor:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"triton_linear_glu: unknown weight_format {weight_format!r}; known: {sorted(WEIGHT_FORMATS)}")
    x2 = _rows(x)
    n_out = weight.shape[0] // 2
    if gemv_glu_applies(x2, weight, weight_format, group_size) and weight_format == "int4":
        y = int4_gemv(x2, weight, scales, zeros, bias, group_size, glu_activation=activation)  # CUDA C++ or Triton
    elif gemv_glu_applies(x2, weight, weight_format, group_size):
        y = gemv(x2, WEIGHT_FORMATS[weight_format], weight, scales, zeros, bias, group_size, glu_activation=activation)
    else:
        gate_up = _linear(x2, weight, scales, zeros, bias, weight_format, group_size)
        y = gate_up.new_empty((x2.shape[0], n_out))
        glu_packed_launch(gate_up, activation, y)
    return y.view(*x.shape[:-1], n_out)


@triton_linear_glu.register_fake
def _triton_linear_glu_fake(x, weight, scales, zeros, bias, weight_format, group_size, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))
