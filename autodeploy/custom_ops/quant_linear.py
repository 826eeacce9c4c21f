"""Quantized linears: ``autodeploy::torch_quant_{fp8,int8,int4}_linear`` (references) and the weight layouts.

Every format computes ``y = x @ W^T (+ bias)`` in ``x.dtype`` with ``W`` reconstructed from integer or fp8 codes;
the references do the arithmetic in float32 and run anywhere (CPU included). The Triton backends
(``custom_ops/triton/quant_linear.py``) take the same arguments and reproduce these numerics up to float32
summation order.

- **fp8** ``(x, weight [N, K] float8_e4m3fn, weight_scale [N] f32, bias)``: ``W = weight * weight_scale[:, None]``
  (a per-tensor checkpoint scale is stored broadcast to ``[N]``). Activations are quantized dynamically per
  token: ``x_scale = max|x_row| / 448``, ``xq = fp8(clamp(x / x_scale))``; ``y = (xq @ weight^T) * x_scale *
  weight_scale``.
- **int8** (weight-only) ``(x, weight [N, K] int8, weight_scale [N] f32, bias)``: ``W = weight * weight_scale``.
- **int4** (weight-only, group-wise) ``(x, qweight [N, Kp/8] int32, scales [Gn, N] f16, zeros [Gn, N] f16 | None,
  bias, group_size)``: ``W[n, k] = (q[n, k] - zero[g, n]) * scale[g, n]`` with ``g = k // group_size`` and
  ``q`` in ``0..15``; without ``zeros`` the zero point is 8 (symmetric). Zero points are floats, so both the
  integer zero points of GPTQ/AWQ and a float minimum (``W = q * s + min``, as torchao and llama.cpp's Q4_1 use)
  are exact. ``Kp`` is ``K`` rounded up to ``INT4_CHUNK``; the padding columns are never read against real
  inputs.

**int4 packing** ("planar", what the Triton kernel reads): K is cut into chunks of 128; within chunk ``c`` the
16 int32 words ``qweight[n, 16c : 16c + 16]`` hold, in nibble ``j`` (bits ``4j .. 4j + 3``) of word ``w``, the
code of ``k = 128c + 16j + w``. A kernel loads one ``[BLOCK_N, 16]`` word tile per chunk and gets eight
contiguous ``[BLOCK_N, 16]`` K-slices from it with one shift and mask each, so no register shuffles are
needed. ``group_size`` must be 16, 32, 64 or a multiple of 128 (every 16-wide slice lies in one group).

**int4 row tiles**: when N is a multiple of ``INT4_ROW_TILE`` (T = 64), the same ``[N, Kp/8]`` tensor holds
each T-row tile's chunks one after another, ``[N/T, chunks, T, 16]`` words: row ``n``'s chunk ``c`` starts
at word ``((n // T) * chunks + c) * T * 16 + (n % T) * 16``. A kernel reading one chunk of a tile's rows then
reads one contiguous 4 KB block instead of 64 bytes from each of 64 rows kilobytes apart (Llama-3.1-8B's int4
linears at one token: 73.8 -> 68.5 µs a layer on an H100, run 35). Otherwise (T = 1) rows are stored one after
another. Slicing or concatenating rows at multiples of T keeps the layout; ``int4_cat_rows`` concatenates any.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_SCALE_MIN = 1e-12 / FP8_MAX  # floor of the per-token scale (all-zero rows quantize to zeros, not NaN)
INT4_CHUNK = 128  # K elements per packed chunk (16 int32 words)
INT4_SLICE = 16  # K elements per nibble plane of a chunk
INT4_ROW_TILE = 64  # rows of a stored tile of int4 codes (module docstring)
_F16_SCALE_MIN = 2.0**-14  # smallest normal float16: stored scales never underflow


# ---- activations -------------------------------------------------------------------------------------------------
def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq [..., K] fp8, scale [..., 1] f32)`` with ``x ~= xq * scale`` row by row."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=FP8_SCALE_MIN)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


# ---- weights -----------------------------------------------------------------------------------------------------
def quantize_fp8_weight(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [..., N, K] fp8, weight_scale [..., N] f32)``; one scale per output channel (row), or one for the
    whole tensor (broadcast to every row)."""
    wf = w.float()
    amax = wf.abs().amax(-1) if per_channel else wf.abs().amax().expand(w.shape[:-1])
    scale = (amax / FP8_MAX).clamp(min=FP8_SCALE_MIN)
    return (wf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.contiguous()


def quantize_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [N, K] int8, weight_scale [N] f32)``: symmetric per-channel, codes in -127..127."""
    wf = w.float()
    scale = (wf.abs().amax(-1) / 127.0).clamp(min=1e-12)
    return (wf / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def int4_padded_k(k: int) -> int:
    return -(-k // INT4_CHUNK) * INT4_CHUNK


def int4_group(group_size: int, k: int) -> int:
    """The effective group size (``-1``/``0`` = one group per row) after checking the kernel can use it."""
    g = int4_padded_k(k) if group_size <= 0 else group_size
    if not (g in (16, 32, 64) or g % INT4_CHUNK == 0):
        raise ValueError(f"int4 group size {group_size} is not supported (16, 32, 64 or a multiple of 128)")
    return g


def int4_num_groups(k: int, group_size: int) -> int:
    """Rows of ``scales``/``zeros``: groups that cover the padded K."""
    g = int4_group(group_size, k)
    return -(-int4_padded_k(k) // g)


def int4_row_tile(n: int) -> int:
    """Rows of a stored tile of an int4 ``qweight`` with ``n`` rows: ``INT4_ROW_TILE`` when it divides ``n``, else 1."""
    return INT4_ROW_TILE if n % INT4_ROW_TILE == 0 else 1


def _retile(words: torch.Tensor, tile: int, to_tiles: bool) -> torch.Tensor:
    """Row-major ``[N, Kp/8]`` words to ``tile``-row tiles (``to_tiles``) or back."""
    n, cols = words.shape
    if tile == 1:
        return words
    if to_tiles:
        shape = (n // tile, tile, cols // INT4_SLICE, INT4_SLICE)
    else:
        shape = (n // tile, cols // INT4_SLICE, tile, INT4_SLICE)
    return words.reshape(shape).permute(0, 2, 1, 3).reshape(n, cols)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (0..15, any integer dtype) -> planar ``qweight [N, Kp/8]`` int32 (K zero-padded, rows in
    ``int4_row_tile(N)``-row tiles)."""
    n, k = q.shape
    kp = int4_padded_k(k)
    codes = torch.zeros((n, kp), dtype=torch.int32, device=q.device)
    codes[:, :k] = q.to(torch.int32)
    planes = codes.view(n, kp // INT4_CHUNK, 8, INT4_SLICE)  # [N, chunks, nibble j, word w]
    packed = torch.zeros((n, kp // INT4_CHUNK, INT4_SLICE), dtype=torch.int32, device=q.device)
    for j in range(8):
        packed |= planes[:, :, j, :] << (4 * j)
    return _retile(packed.view(n, kp // 8), int4_row_tile(n), to_tiles=True)


def unpack_int4(qweight: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Planar ``qweight [N, Kp/8]`` -> codes ``[N, k]`` (uint8, 0..15)."""
    n, words = qweight.shape
    rows = _retile(qweight, int4_row_tile(n), to_tiles=False)
    chunks = rows.reshape(n, words // INT4_SLICE, 1, INT4_SLICE)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device).view(1, 1, 8, 1)
    codes = ((chunks >> shifts) & 0xF).to(torch.uint8).view(n, words * 8)
    return codes if k is None else codes[:, :k]


def int4_cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``qweight``s concatenated along N, in the row tiles the total takes (each part's own may differ)."""
    rows = torch.cat([_retile(p, int4_row_tile(p.shape[0]), to_tiles=False) for p in parts])
    return _retile(rows, int4_row_tile(rows.shape[0]), to_tiles=True)


def quantize_int4_weight(
    w: torch.Tensor, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest group-wise int4: ``(qweight [N, Kp/8] int32, scales [Gn, N] f16, zeros [Gn, N] f16 | None)``.

    Asymmetric (default): ``scale = (max - min) / 15``, float ``zero = -min / scale`` (the group's range maps
    onto 0..15 exactly). Symmetric: ``scale = max|w| / 7``, zero point 8. Codes are computed against the
    float16-rounded scale and zero that are stored, so reconstruction uses exactly what the kernels read.
    """
    n, k = w.shape
    g = int4_group(group_size, k)
    groups = int4_num_groups(k, group_size)
    wf = torch.zeros((n, groups * g), dtype=torch.float32, device=w.device)
    wf[:, :k] = w.float()
    valid = torch.zeros((1, groups * g), dtype=torch.bool, device=w.device)
    valid[:, :k] = True
    wg, vg = wf.view(n, groups, g), valid.view(1, groups, g)
    if symmetric:
        scale = (wg.abs().amax(-1) / 7.0).clamp(min=_F16_SCALE_MIN).half()  # [N, Gn]
        zero = None
        zf = torch.full_like(scale, 8.0, dtype=torch.float32)
    else:
        hi = torch.where(vg, wg, float("-inf")).amax(-1)  # [N, Gn]
        lo = torch.where(vg, wg, float("inf")).amin(-1)
        empty = ~vg.any(-1).expand(n, groups)
        hi, lo = torch.where(empty, 0.0, hi), torch.where(empty, 0.0, lo)
        # a group far from zero (or constant) gets a coarser scale, so |zero| stays where float16 is exact enough
        floor = torch.maximum(hi.abs(), lo.abs()) / 1024.0
        scale = torch.maximum((hi - lo) / 15.0, floor).clamp(min=_F16_SCALE_MIN).half()
        zero = (-lo / scale.float()).half()
        zf = zero.float()
    q = (wg / scale.float()[..., None] + zf[..., None]).round().clamp(0, 15).to(torch.uint8)
    qweight = pack_int4(q.view(n, groups * g)[:, :k])
    return qweight, scale.t().contiguous(), None if zero is None else zero.t().contiguous()


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, k: int
) -> torch.Tensor:
    """``W [N, k]`` float32 from the planar layout."""
    g = int4_group(group_size, k)
    codes = unpack_int4(qweight, k).float()  # [N, k]
    idx = torch.arange(k, device=qweight.device) // g
    s = scales.float()[idx].t()  # [N, k]
    z = zeros.float()[idx].t() if zeros is not None else 8.0
    return (codes - z) * s


# ---- reference ops -----------------------------------------------------------------------------------------------
def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


@torch.library.custom_op("autodeploy::torch_quant_fp8_linear", mutates_args=())
def torch_quant_fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    xq, x_scale = quantize_fp8_per_token(x)
    y = (xq.float() @ weight.float().t()) * x_scale * weight_scale.float()
    return _finish(y, bias, x.dtype)


@torch.library.custom_op("autodeploy::torch_quant_int8_linear", mutates_args=())
def torch_quant_int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    y = (x.float() @ weight.float().t()) * weight_scale.float()
    return _finish(y, bias, x.dtype)


@torch.library.custom_op("autodeploy::torch_quant_int4_linear", mutates_args=())
def torch_quant_int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 128,
) -> torch.Tensor:
    w = dequantize_int4(qweight, scales, zeros, group_size, x.shape[-1])
    return _finish(x.float() @ w.t(), bias, x.dtype)


def _linear_fake(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


@torch_quant_fp8_linear.register_fake
def fp8_linear_fake(x, weight, weight_scale, bias=None):
    return _linear_fake(x, weight.shape[0])


@torch_quant_int8_linear.register_fake
def int8_linear_fake(x, weight, weight_scale, bias=None):
    return _linear_fake(x, weight.shape[0])


@torch_quant_int4_linear.register_fake
def int4_linear_fake(x, qweight, scales, zeros=None, bias=None, group_size=128):
    return _linear_fake(x, qweight.shape[0])
