"""Triton gated activation: ``autodeploy::triton_glu_packed`` (contract: ``custom_ops/gated_mlp.py``).

``gate_up [..., 2I] -> act(gate) * up [..., I]`` for ``silu`` (SwiGLU), ``gelu``, ``gelu_tanh`` (GeGLU), ``relu``,
``relu2``. Memory-bound: 2I elements read and I written per row; a program covers ``BLOCK`` channels of one
row (contiguous 16-byte loads of both halves). As in the reference the activation is computed in float32 and
rounded to the input dtype before the product with ``up``.

``glu_fp8_launch`` writes, instead of the output, its per-token fp8 quantization (``quantize_fp8_per_token`` of
the output as rounded to its dtype): one program a row computes the row twice, chunk by chunk, for its maximum
and then for its codes (the second pass reads the row from L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import gated_mlp as _reference  # noqa: F401  (registers the torch op family)
from ._common import INTERPRET, cast_rne, fp8_scale, next_pow2, pdl_enter, pdl_flags, tanh, tl_dtype, to_fp8

#: activation name -> the kernel's ``ACT`` code
ACTIVATION_CODES: dict[str, int] = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4}
MAX_BLOCK = 2048
FP8_BLOCK, FP8_WARPS = 2048, 8  # the fp8-output kernel's chunk of a row and its warps


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 0:
        y = x / (1.0 + tl.exp(-x))
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 3:
        y = tl.maximum(x, 0.0)
    else:
        y = tl.maximum(x, 0.0)
        y = y * y
    return y


@triton.jit
def _glu_kernel(gu_ptr, o_ptr, inter, stride_gu, stride_o, BLOCK: tl.constexpr, ACT: tl.constexpr,
                RNE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    act = cast_rne(_activate(gate.to(tl.float32), ACT), gate.dtype, RNE)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, cast_rne(out, o_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _glu_chunk(gu_row_ptr, cols, mask, inter, ACT: tl.constexpr, OUT_DTYPE: tl.constexpr, RNE: tl.constexpr):
    """``act(gate) * up`` at ``cols`` of one row, rounded as ``_glu_kernel`` stores it, as float32 (0 where masked)."""
    gate = tl.load(gu_row_ptr + cols, mask=mask, other=0.0)
    up = tl.load(gu_row_ptr + inter + cols, mask=mask, other=0.0)
    act = cast_rne(_activate(gate.to(tl.float32), ACT), gate.dtype, RNE)
    return cast_rne(act.to(tl.float32) * up.to(tl.float32), OUT_DTYPE, RNE).to(tl.float32)


@triton.jit
def _glu_fp8_rows_kernel(gu_ptr, q_ptr, s_ptr, inter, stride_gu, stride_q, BLOCK: tl.constexpr, ACT: tl.constexpr,
                         OUT_DTYPE: tl.constexpr, RNE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    gu_row = gu_ptr + row * stride_gu
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, inter, BLOCK):
        cols = start + offs
        amax = tl.maximum(amax, tl.abs(_glu_chunk(gu_row, cols, cols < inter, inter, ACT, OUT_DTYPE, RNE)))
    scale = fp8_scale(tl.max(amax, 0))
    tl.store(s_ptr + row, scale)
    for start in range(0, inter, BLOCK):  # the row again, from L2: recomputed rather than stored and re-read
        cols = start + offs
        mask = cols < inter
        out = _glu_chunk(gu_row, cols, mask, inter, ACT, OUT_DTYPE, RNE)
        tl.store(q_ptr + row * stride_q + cols, to_fp8(out / scale), mask=mask)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"triton_glu_packed: unknown activation {activation!r}; known: {sorted(ACTIVATION_CODES)}")


def glu_fp8_launch(
    gate_up: torch.Tensor, activation: str, codes: torch.Tensor, scales: torch.Tensor,
    block: int = FP8_BLOCK, warps: int = FP8_WARPS,
) -> None:
    """``gate_up [R, 2I]`` -> the output's per-token fp8 ``codes [R, I]`` and ``scales [R, 1]`` float32."""
    _check_activation(activation)
    inter = gate_up.shape[-1] // 2
    gu = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    if gu.shape[0] == 0 or inter == 0:
        return
    _glu_fp8_rows_kernel[(gu.shape[0],)](
        gu, codes, scales, inter, gu.stride(0), codes.stride(0), BLOCK=min(block, next_pow2(inter)),
        ACT=ACTIVATION_CODES[activation], OUT_DTYPE=tl_dtype(gu.dtype), RNE=INTERPRET and gu.dtype == torch.bfloat16,
        num_warps=1 if INTERPRET else warps, **pdl_flags(gu.device, gu.shape[0]),
    )


def glu_packed_launch(gate_up: torch.Tensor, activation: str, out: torch.Tensor) -> None:
    """``gate_up [..., 2I]`` -> ``out [..., I]`` (contiguous)."""
    _check_activation(activation)
    inter = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * inter)  # [rows, 2I]
    gu = gu if gu.stride(-1) == 1 else gu.contiguous()
    o = out.view(-1, inter)
    if gu.shape[0] == 0 or inter == 0:
        return
    block = min(next_pow2(inter), MAX_BLOCK)
    warps = 1 if INTERPRET else max(1, min(8, block // 256))
    _glu_kernel[(gu.shape[0], triton.cdiv(inter, block))](
        gu, o, inter, gu.stride(0), o.stride(0), BLOCK=block, ACT=ACTIVATION_CODES[activation],
        RNE=INTERPRET and gu.dtype == torch.bfloat16, num_warps=warps,
        **pdl_flags(gu.device, gu.shape[0]),
    )


@torch.library.custom_op("autodeploy::triton_glu_packed", mutates_args=())
def triton_glu_packed(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    out = gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
    glu_packed_launch(gate_up, activation, out)
    return out


@triton_glu_packed.register_fake
def _triton_glu_packed_fake(gate_up, activation):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
