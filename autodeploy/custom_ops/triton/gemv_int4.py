"""The int4 steps of the GEMV (``gemv.py``): one ``BLOCK_K`` step of planar int4 codes (``quant_linear.py``: nibble
``j`` of word ``w`` in chunk ``c`` is ``k = 128c + 16j + w``) against the activations, on the CUDA cores or on the
tensor cores.

**CUDA cores** (``int4_step``): each nibble plane is one ``[BLOCK_N, BLOCK_K / 8]`` tile of codes, turned into
float32 by OR-ing it into the bits of 2^23, multiplied against the matching strided activations; a group's scale and
zero point are applied to the group's partial sum: ``s * (sum q x - z * sum x)``. About nine instructions a weight
(shift, mask, OR, subtract, multiply-add, and the activations' broadcasts), which is what bounds it.

**Tensor cores** (``int4_tc_step``, 16-bit activations, groups of a multiple of 128, ``BLOCK_K`` = 128): the
weight tile is the MMA's left operand, built in registers from the words: one shift and one ``lop3`` per two
weights turn planes ``j`` and ``j + 4`` of a word into a pair of 16-bit floats ``MAGIC + q`` (the nibble in the low
mantissa bits of 128.0 in bf16, of 1024.0 in fp16: exact), and that 32-bit register is already the operand's
(``k``, ``k + 1``) pair, so nothing is shuffled. The chunk's K order is ``k' = 32 j + 2 w + h`` (plane ``j + 4h`` of
word ``w``); the activation tile is gathered in that order, ``[128, 16]``: the few real tokens repeated across the
16 columns the MMA needs. The product ``sum (MAGIC + q) x`` is exact per term in float32; each chunk adds it times
its scale, and ``sum_c s_c (MAGIC + z_c) sum_{k in c} x_k``, computed apart (its loads issued before the chunk
loop, its reductions after, so the loop carries no reduction across threads), removes the offset and the zero point
in float32. Each chunk's activations and scales are loaded a chunk ahead.
"""

from __future__ import annotations

import triton
import triton.language as tl

_MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # float bits of 2^23: OR-ing a code < 2^23 in gives 2^23 + code


@triton.jit
def int4_step(acc, words, x_rows, s_ptr, z_ptr, k0, K, word, col_base, w_ok, m_ok, n_ok, offs_n, stride_sg,
              GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              WORDS: tl.constexpr):
    """One ``BLOCK_K`` step of int4 planar codes ``words [BN, WORDS]`` on the CUDA cores: nibble plane ``j``
    against the activations at ``k0 + col_base + 16 j``; each scale group's partial sum gets its scale and zero."""
    PLANES: tl.constexpr = GROUP // 16 if GROUP < 128 else 8  # nibble planes per scale group
    part = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
    for j in tl.static_range(8):
        kk = k0 + col_base + 16 * j
        xj = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
        codes = (((words >> (4 * j)) & 0xF) | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0
        part += codes[None, :, :] * xj[:, None, :]
        x_sum += xj
        if (j + 1) % PLANES == 0:  # end of a scale group for every word column
            g = (k0 + 128 * (word // 16) + 16 * (j + 1 - PLANES)) // GROUP
            s_off = g[None, :] * stride_sg + offs_n[:, None]
            s_ok = n_ok[:, None] & w_ok[None, :]
            s = tl.load(s_ptr + s_off, mask=s_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + s_off, mask=s_ok, other=0.0).to(tl.float32)
            else:
                z = tl.full((BLOCK_N, WORDS), 8.0, dtype=tl.float32)
            acc += s[None, :, :] * (part - z[None, :, :] * x_sum[:, None, :])
            part = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
    return acc


@triton.jit
def _code_pair(words, J: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """Planes ``J`` and ``J + 4`` of ``words [BN, 16]`` as 16-bit floats ``MAGIC + q``, ``[BN, 16, 2]``."""
    shifted = words >> (4 * J)
    if ASM and MAGIC == 0x43004300:  # (w & 0x000F000F) | MAGIC in one instruction (the compiler emits two)
        pairs = tl.inline_asm_elementwise("lop3.b32 $0, $1, 983055, 1124090624, 234;", "=r,r", [shifted],
                                          dtype=tl.int32, is_pure=True, pack=1)
    elif ASM:
        pairs = tl.inline_asm_elementwise("lop3.b32 $0, $1, 983055, 1677747200, 234;", "=r,r", [shifted],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        pairs = (shifted & 0x000F000F) | MAGIC
    lo = (pairs & 0xFFFF).to(tl.int16)
    hi = (pairs >> 16).to(tl.int16)
    if MAGIC == 0x43004300:
        out = tl.join(lo.to(tl.bfloat16, bitcast=True), hi.to(tl.bfloat16, bitcast=True))
    else:
        out = tl.join(lo.to(tl.float16, bitcast=True), hi.to(tl.float16, bitcast=True))
    return out


@triton.jit
def int4_tc_x(x_ptr, s_ptr, k0, K, M, stride_xm, n_ok, offs_n, stride_sg, GROUP: tl.constexpr, X_COLS: tl.constexpr):
    """The chunk at ``k0``'s operands besides the codes (the kernel loads them a chunk ahead): its activations in the
    tensor-core steps' K order, zeros past K, ``[128, 1]`` for one token (broadcast later, in registers), else
    ``[128, 16]`` with column ``c`` token ``c % X_COLS`` (repeating loaded columns instead goes through shared
    memory and two more barriers a chunk); and its scales ``[BN]``."""
    kq = tl.arange(0, 128)
    kk = k0 + 16 * (kq // 32 + 4 * (kq % 2)) + (kq % 32) // 2
    tok = tl.arange(0, 1 if X_COLS == 1 else 16) % X_COLS
    x = tl.load(x_ptr + tok[None, :] * stride_xm + kk[:, None], mask=(tok < M)[None, :] & (kk < K)[:, None], other=0.0)
    s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=n_ok & (offs_n * 0 + k0 < K), other=0.0)
    return x, s


@triton.jit
def int4_tc_step(acc, words, x, s, HW: tl.constexpr):
    """``acc [BN, 16] += s * sum (MAGIC + q) x`` over one 128-long chunk of int4 planar codes ``words [BN, 16]``, its
    activations ``x`` and scales ``s`` (``int4_tc_x``), on the tensor cores (module docstring); column ``c`` of
    ``acc`` is token ``c % X_COLS``. ``int4_tc_offset`` is the offset and zero point to subtract at the end. ``HW``
    is "not the interpreter": there the same operands meet in exact float32."""
    MAGIC: tl.constexpr = 0x43004300 if x.dtype == tl.bfloat16 else 0x64006400
    q01 = tl.join(_code_pair(words, 0, MAGIC, HW), _code_pair(words, 1, MAGIC, HW))  # [BN, 16 w, 2 h, 2 j]
    q23 = tl.join(_code_pair(words, 2, MAGIC, HW), _code_pair(words, 3, MAGIC, HW))
    a = tl.reshape(tl.permute(tl.join(q01, q23), (0, 4, 3, 1, 2)), (words.shape[0], 128))  # k' = 32 j + 2 w + h
    xt = tl.broadcast_to(x, (128, 16))
    zero = tl.zeros(acc.shape, dtype=tl.float32)
    if HW:
        part = tl.dot(a, xt, zero)
    else:
        part = tl.dot(a.to(tl.float32), xt.to(tl.float32), zero, input_precision="ieee")
    return acc + s.to(tl.float32)[:, None] * part


@triton.jit
def int4_tc_offset_inputs(x_ptr, s_ptr, z_ptr, c0, k_hi, K, M, stride_xm, n_ok, offs_n, stride_sg,
                          GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, X_COLS: tl.constexpr, CHUNKS: tl.constexpr):
    """The activations ``[X_COLS, CHUNKS, 128]``, scales and zero points ``[BN, CHUNKS]`` of the ``CHUNKS`` chunks
    from ``c0`` (those past ``k_hi`` zeroed): what ``int4_tc_offset`` needs, loaded apart so the kernel can issue
    the loads before its chunk loop and use them after."""
    chunk = tl.arange(0, CHUNKS)
    kc = c0 + chunk * 128
    kk = kc[None, :, None] + tl.arange(0, 128)[None, None, :]
    tok = tl.arange(0, X_COLS)
    x = tl.load(x_ptr + tok[:, None, None] * stride_xm + kk,
                mask=(tok < M)[:, None, None] & (kk < K) & (kc < k_hi)[None, :, None], other=0.0)
    s_off = (kc // GROUP)[None, :] * stride_sg + offs_n[:, None]
    s_ok = n_ok[:, None] & (kc < k_hi)[None, :]
    s = tl.load(s_ptr + s_off, mask=s_ok, other=0.0)
    if HAS_ZEROS:
        z = tl.load(z_ptr + s_off, mask=s_ok, other=0.0)
    else:
        z = tl.full(s.shape, 8.0, dtype=tl.float32)
    return x, s, z


@triton.jit
def int4_tc_offset(x, s, z):
    """``[BN, 16]``: ``sum over the chunks c of s_c (MAGIC + z_c) sum_{k in c} x_k`` for ``int4_tc_offset_inputs``'
    chunks, what the tensor-core steps' sums hold beyond ``sum (q - z) s x`` (columns as ``int4_tc_step``'s)."""
    OFFSET: tl.constexpr = 128.0 if x.dtype == tl.bfloat16 else 1024.0
    X_COLS: tl.constexpr = x.shape[0]
    x_sum = tl.sum(x.to(tl.float32), 2)  # [X_COLS, CHUNKS]
    out = tl.sum((s.to(tl.float32) * (OFFSET + z.to(tl.float32)))[:, None, :] * x_sum[None, :, :], 2)  # [BN, X_COLS]
    return tl.reshape(tl.broadcast_to(out[:, None, :], (s.shape[0], 16 // X_COLS, X_COLS)), (s.shape[0], 16))
