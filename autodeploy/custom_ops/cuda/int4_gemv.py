"""The int4 weight-only GEMV on the tensor cores in CUDA C++ (``int4_gemv_mma.cu``): what the decode step runs for
int4 linears of up to ``MMA_GEMV_MAX_TOKENS`` tokens on CUDA, in place of the Triton GEMV (``triton/gemv.py``).
Its loop is written for the instructions it issues: codes and activations reach shared memory by ``cp.async``
(no registers held while in flight), a lop3 a pair of weights, activations shared by the tiles of a warp
(docs/PERFORMANCE.md, runs 89-99).

Same inputs and numerics as ``gemv(x, W_INT4, ...)``: ``x [M, K]`` 16-bit, planar codes in ``quant_linear.py``'s
layout, scales and zero points ``[Gn, N]``; with ``glu_activation`` the packed gate/up product's
``act(gate) * up``, each half rounded to x's dtype first. ``mma_gemv_applies`` says when it serves;
``AUTODEPLOY_INT4_GEMV=triton`` turns it off (A/B runs); a failed compile turns it off for the process, with a
warning. ``int4_gemv_mma_or_none`` is the dispatch's entry (None: the Triton GEMV serves), ``int4_gemv_mma`` the
checked one of tests and benchmarks.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..quant_linear import INT4_CHUNK, int4_group, int4_row_tile

log = logging.getLogger(__name__)

MMA_GEMV_MAX_TOKENS = 4  # the MMA has 8 columns; the engine sends at most the Triton GEMV's 4 tokens
TILE_BYTES = 1088  # the .cu's: a tile's chunk in a warp's ring (codes, scales, zero points); 256 bytes a token
_SOURCE = Path(__file__).with_name("int4_gemv_mma.cu")
_compile_failed = False


class MmaGemvUnavailable(RuntimeError):
    """NVRTC or the driver refused the kernel; raised once, after which ``mma_gemv_applies`` says no."""


@dataclass(frozen=True)
class MmaGemvConfig:
    warps: int  # a block's warps, which take its tiles' chunks of K in turn
    tiles: int  # 16-row MMA tiles a block holds (1, 2 or 4): each chunk's activations serve them all
    stages: int  # a warp's ring of chunks in shared memory (stages - 1 in flight)

    def smem_bytes(self, tokens: int) -> int:
        ring = self.warps * self.stages * (self.tiles * TILE_BYTES + tokens * 256)
        return ring + self.warps * self.tiles * 16 * 8 * 4  # and the warps' partial sums


def mma_gemv_config(n: int, k: int) -> MmaGemvConfig:
    """Read off ``bench/gemv.py --variants mma`` on an H200 (Llama-3.1-8B's linears at 1 and 2 tokens, run 98;
    one rank's of two, run 100): enough warps that each has 4-8 chunks of K, two tiles a warp (their activations
    shared), four for qkv."""
    if k >= 8192:  # down-like: 16 warps over 112 chunks (12.65 us at M = 1)
        return MmaGemvConfig(16, 2, 4)
    if n >= 3 * k:  # gate/up-like: ~900 blocks of 4 warps (22.9 us; at TP = 2 14.5 us)
        return MmaGemvConfig(4, 2, 3)
    if n > k:  # qkv-like (7.66 us)
        return MmaGemvConfig(8, 4, 4)
    return MmaGemvConfig(8, 2, 4)  # o-like (5.91 us)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _device_smem(device_index: int) -> int:
    """Shared memory a block may take on the device; 0 where the kernel cannot run (before sm_80, no NVRTC)."""
    if not hasattr(torch.cuda, "_compile_kernel") or torch.cuda.get_device_capability(device_index) < (8, 0):
        return 0
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def _copies_aligned(t: torch.Tensor) -> bool:
    """16-byte copies of 8 rows' 16-bit scales (or zero points) of a group."""
    return (t.dtype in (torch.float16, torch.bfloat16) and t.data_ptr() % 16 == 0 and t.stride(1) == 1
            and t.stride(0) % 8 == 0)


def mma_gemv_applies(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> bool:
    """16-bit activations of at most ``MMA_GEMV_MAX_TOKENS`` tokens in 16-byte aligned rows, groups of a multiple
    of 128, weight rows in 64-row tiles (N a multiple of 64); codes, scales and zero points as 16-byte copies
    take them; a GPU of compute capability 8.0 or newer with the shared memory the shape's tiles take."""
    m, k = x.shape
    return (
        x.is_cuda and not _disabled() and not _compile_failed
        and mma_gemv_config(qweight.shape[0], k).smem_bytes(m) <= _device_smem(_index(x.device))
        and x.dtype in (torch.bfloat16, torch.float16) and 0 < m <= MMA_GEMV_MAX_TOKENS and x.stride(1) == 1
        and x.data_ptr() % 16 == 0 and (m == 1 or x.stride(0) % 8 == 0)
        and int4_group(group_size, k) % INT4_CHUNK == 0 and int4_row_tile(qweight.shape[0]) == 64
        and qweight.stride(1) == 1 and qweight.data_ptr() % 16 == 0
        and _copies_aligned(scales)
        and (zeros is None or (_copies_aligned(zeros) and zeros.stride() == scales.stride()
                               and zeros.dtype == scales.dtype))
    )


def _disabled() -> bool:
    return os.environ.get("AUTODEPLOY_INT4_GEMV", "").lower() == "triton"


@functools.lru_cache(maxsize=None)
def _compiled(defines: tuple[tuple[str, int], ...], device_index: int):
    global _compile_failed
    source = "".join(f"#define {name} {value}\n" for name, value in defines) + _SOURCE.read_text()
    try:
        with torch.cuda.device(device_index):
            return torch.cuda._compile_kernel(source, "int4_gemv_mma")
    except RuntimeError as err:  # NVRTC or the driver: the Triton GEMV serves from here on
        _compile_failed = True
        log.warning("the CUDA int4 GEMV did not compile (%s); the Triton GEMV serves int4 decode", err)
        raise MmaGemvUnavailable(str(err)) from err


@functools.lru_cache(maxsize=None)
def _kernel(defines: tuple[tuple[str, int], ...], smem_bytes: int, device_index: int):
    kernel = _compiled(defines, device_index)
    with torch.cuda.device(device_index):
        kernel.set_shared_memory_config(smem_bytes)  # a RuntimeError past the device's limit (a config too big)
    return kernel


def int4_gemv_mma_or_none(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, group_size: int, glu_activation: str | None = None,
) -> torch.Tensor | None:
    """The product with ``mma_gemv_config``'s tiles where ``mma_gemv_applies``; None where it does not (an
    unknown activation included: the Triton GEMV names it in its error), or once the kernel failed to compile."""
    from ..triton.glu import ACTIVATION_CODES

    if glu_activation not in (None, *ACTIVATION_CODES) or not mma_gemv_applies(x, qweight, scales, zeros, group_size):
        return None
    try:
        return _launch(x, qweight, scales, zeros, bias, group_size, glu_activation,
                       mma_gemv_config(qweight.shape[0], x.shape[1]))
    except MmaGemvUnavailable:
        return None


def int4_gemv_mma(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, group_size: int, glu_activation: str | None = None,
    config: MmaGemvConfig | None = None,
) -> torch.Tensor:
    """The product, or a ValueError where the kernel (or the given tiles) does not take these inputs."""
    m, k = x.shape
    cfg = config or mma_gemv_config(qweight.shape[0], k)
    if not mma_gemv_applies(x, qweight, scales, zeros, group_size) or cfg.tiles not in (1, 2, 4) or (
            cfg.smem_bytes(m) > _device_smem(_index(x.device))):
        raise ValueError(f"int4_gemv_mma does not take x {tuple(x.shape)} {x.dtype} on {x.device}, qweight "
                         f"{tuple(qweight.shape)}, group {group_size}, {cfg} (see mma_gemv_applies)")
    return _launch(x, qweight, scales, zeros, bias, group_size, glu_activation, cfg)


def _launch(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, group_size: int, glu_activation: str | None, cfg: MmaGemvConfig,
) -> torch.Tensor:
    from ..triton.glu import ACTIVATION_CODES  # the codes the .cu's activate() follows

    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n if glu_activation is None else n // 2), dtype=x.dtype, device=x.device)
    defines = (
        ("WARPS", cfg.warps), ("TILES", cfg.tiles), ("STAGES", cfg.stages), ("TOKENS", m),
        ("X_BF16", int(x.dtype == torch.bfloat16)), ("SCALE_BF16", int(scales.dtype == torch.bfloat16)),
        ("BIAS_BF16", int(bias is not None and bias.dtype == torch.bfloat16)), ("GROUP", int4_group(group_size, k)),
        ("HAS_ZEROS", int(zeros is not None)), ("HAS_BIAS", int(bias is not None)),
        ("GLU_ACT", -1 if glu_activation is None else ACTIVATION_CODES[glu_activation]),
    )
    smem = cfg.smem_bytes(m)
    kernel = _kernel(defines, smem, _index(x.device))
    kernel(
        grid=(n // (16 * cfg.tiles), 1, 1), block=(cfg.warps * 32, 1, 1), shared_mem=smem,
        args=[x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
              n, k, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0), qweight.shape[1] * 8 // INT4_CHUNK],
    )
    return y
