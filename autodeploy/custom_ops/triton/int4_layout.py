"""Addresses in the int4 ``qweight`` layout (``custom_ops/quant_linear.py``: planar chunks of 16 words, rows in
``ROW_TILE``-row tiles), shared by every kernel that reads it: ``w_rows = weight_rows(...)`` once, then
``w_rows + int4_cols(k0, word, ROW_TILE)`` for the words of the step at ``k0``. With ``ROW_TILE`` 1 the rows are
stored one after another, as every other weight format is, so ``weight_rows`` serves those too."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def weight_rows(w_ptr, offs_n, stride_wn, ROW_TILE: tl.constexpr):
    """``[BN, 1]`` pointers to the start of rows ``offs_n`` (``stride_wn``: elements of a row; int4: ``Kp / 8``)."""
    n = offs_n.to(tl.int64)
    if ROW_TILE == 1:
        return w_ptr + n[:, None] * stride_wn
    return w_ptr + ((n // ROW_TILE) * ROW_TILE * stride_wn + (n % ROW_TILE) * 16)[:, None]


@triton.jit
def int4_cols(k0, word, ROW_TILE: tl.constexpr):
    """Offsets from ``int4_rows`` of words ``word`` (``0..``, 16 a chunk) of the step that starts at ``k0``."""
    if ROW_TILE == 1:
        return k0 // 8 + word
    return (k0 // 128 + word // 16) * (ROW_TILE * 16) + word % 16
