"""Helpers shared by the Triton kernels: interpreter detection, programmatic dependent launch, a matrix-product
wrapper, tanh, device facts."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..quant_linear import FP8_MAX, FP8_SCALE_MIN

#: Running under ``TRITON_INTERPRET=1`` (CPU tests). Read once: Triton reads it at import time too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SOFTWARE_FP8: tl.constexpr = tl.constexpr(INTERPRET)  # to_fp8 rounds in software under the interpreter
_FP8_MAX: tl.constexpr = tl.constexpr(FP8_MAX)
_FP8_SCALE_MIN: tl.constexpr = tl.constexpr(FP8_SCALE_MIN)

#: ``AUTODEPLOY_PDL=0`` launches every kernel the ordinary way (see ``pdl_flags``)
PDL_ENV = "AUTODEPLOY_PDL"
#: launches over more tokens than this (prefill, large decode batches) are ordinary ones: their kernels run long
#: enough that the launch gap is noise, and early-launched blocks would only sit on the SMs waiting
PDL_MAX_ROWS = 128

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: pdl_flags never turns it on
    gdc_launch_dependents = gdc_wait = None

LOG2E = 1.4426950408889634

#: arrival counters per device for kernels whose last program to arrive finishes the work of a group (the split-K
#: GEMM and GEMV): at most this many groups in one launch
NUM_LOCKS = 4096
_LOCKS: dict[torch.device, torch.Tensor] = {}

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return _TL_DTYPES[dtype]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to float32 first.

    The interpreter (Triton 3.6-3.9) multiplies bf16 operands as their raw uint16 bits, so under it every
    product runs in float32 on operands already rounded to the kernel's dtype, which is what the tensor
    cores compute on the GPU (exact products, float32 accumulation).
    """
    return INTERPRET and dtype != torch.float32


def split_locks(device: torch.device) -> torch.Tensor:
    """The device's ``NUM_LOCKS`` int32 arrival counters: zeroed once, outside CUDA-graph capture; every use
    leaves them zero again (the last program of a group resets its counter), so kernels on one stream share
    them."""
    locks = _LOCKS.get(device)
    if locks is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split counters must be allocated before CUDA-graph capture (run the op once first)")
        locks = _LOCKS[device] = torch.zeros(NUM_LOCKS, dtype=torch.int32, device=device)
    return locks


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Multiprocessors of ``device``; a small stand-in on CPU so the interpreter exercises the split paths."""
    if device.type != "cuda":
        return 4
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_flags(device: torch.device, rows: int) -> dict:
    """Launch options of a kernel that starts with ``pdl_enter(USE_PDL)``: programmatic dependent launch on
    Hopper and newer for a launch over at most ``PDL_MAX_ROWS`` tokens (unless ``AUTODEPLOY_PDL=0``), so the
    kernel is scheduled while the previous one in the stream drains, also inside a CUDA graph.

    Contract of such a kernel: before ``pdl_enter`` it may only read memory no earlier kernel writes (weights);
    every read of an activation and every write comes after it. The interpreter and other devices get
    ``USE_PDL=False`` and an ordinary launch.
    """
    if INTERPRET or device.type != "cuda" or rows > PDL_MAX_ROWS or os.environ.get(PDL_ENV, "1") == "0":
        return {"USE_PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _pdl_capable(index):
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Wait until the previous kernel in the stream has finished and its writes are visible, then let the next
    kernel be scheduled (it waits for this one in turn). A no-op without ``USE_PDL``."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b``: tensor cores for 16-bit operands, exact float32 (``ieee``) for float32 ones."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def to_fp16_clamped(x):
    """``x`` in float16, clamped to its range (the operand of a float16 product: float8 codes convert to float16 at
    one instruction per two values, to bfloat16 only through float16 or float32)."""
    return tl.clamp(x.to(tl.float32), -65504.0, 65504.0).to(tl.float16)


@triton.jit
def tanh(x):
    """``tanh`` from one ``exp2`` (``tl.math`` has none that runs on every Triton 3.x); saturates to +-1."""
    e = tl.exp2(tl.minimum(x, 30.0) * 2.8853900817779268)  # exp(2x); tanh(30) is 1 in float32
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def fp8_round(x):
    """``x`` (float32) rounded to the nearest float8 e4m3fn value, saturating at +-448, still as float32.

    Round-to-nearest-even on the e4m3 grid (3 mantissa bits, subnormal step 2^-9) by scaling with the exact
    power-of-two step of ``x``'s binade and the 1.5 * 2^23 trick; equals ``torch``'s ``.to(float8_e4m3fn)``.
    The interpreter's own float8 conversion mis-rounds at binade edges; values from here convert exactly.
    """
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((exponent + 124) << 23).to(tl.float32, bitcast=True)  # 2^(exponent - 3)
    return ((x / step + 12582912.0) - 12582912.0) * step


@triton.jit
def fp8_scale(amax):
    """The per-token fp8 scale of a row whose largest magnitude is ``amax``: ``amax / 448``, floored so that an
    all-zero row gets zero codes, not NaN (``quantize_fp8_per_token``)."""
    return tl.maximum(amax / _FP8_MAX, _FP8_SCALE_MIN)


@triton.jit
def to_fp8(x):
    """``x`` (float32) as float8 e4m3fn codes, rounded to nearest-even and saturated at +-448: on the GPU the
    hardware conversion (a few instructions fewer than ``fp8_round``, which it equals), under the interpreter
    ``fp8_round`` first (the interpreter's own conversion mis-rounds)."""
    if _SOFTWARE_FP8:
        x = fp8_round(x)
    else:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def split_k_sum(acc, part_ptr, lock_ptr, tile, pid_k, SPLIT_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Split-K without atomics on the data: ``(last, total)``.

    Every program writes its float32 ``[ROWS, COLS]`` partial to ``part_ptr`` (``[SPLIT_K, tiles, ROWS, COLS]``)
    and counts itself in ``lock_ptr[tile]``; for the last to arrive ``last`` is true and ``total`` is the sum of
    the partials in split order (deterministic), and the counter is back at zero for the next launch (so a
    CUDA graph can replay it). The other programs get ``last`` false and must not write the tile.
    """
    num_tiles = tl.num_programs(0)
    cell = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    tile_size = ROWS * COLS
    tl.store(part_ptr + (pid_k * num_tiles + tile).to(tl.int64) * tile_size + cell, acc)
    tl.debug_barrier()  # every thread's partial is written before the counter is released
    arrived = tl.atomic_add(lock_ptr + tile, 1)
    last = arrived == SPLIT_K - 1
    total = tl.zeros((ROWS, COLS), dtype=tl.float32)
    if last:
        for s in range(SPLIT_K):
            total += tl.load(part_ptr + (s * num_tiles + tile).to(tl.int64) * tile_size + cell, cache_modifier=".cg")
        tl.atomic_xchg(lock_ptr + tile, 0)
    return last, total


@triton.jit
def cast_rne(x, dtype: tl.constexpr, RNE: tl.constexpr):
    """``x.to(dtype)``. With ``RNE`` (set under the interpreter) a cast to bf16 rounds the float32 bits to
    nearest-even first: the interpreter truncates float32 -> bf16, where the GPU rounds to nearest-even."""
    if RNE and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
