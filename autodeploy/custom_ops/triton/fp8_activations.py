"""Per-token fp8 activations written by the kernel that makes them, for the fp8 linears that read them.

An fp8 linear (``quant_linear.fp8_linear``) quantizes its 16-bit input per token in a launch of its own before
``torch._scaled_mm``. Here the producer of that input writes the quantized form itself, and the linear takes it:

- producers: ``triton_rmsnorm_fp8 -> (y, yq, y_scale)``, ``triton_fused_add_rmsnorm_fp8 -> (y, summed, yq,
  y_scale)``, ``triton_linear_glu_fp8`` with ``quantize_output`` ``-> (h, hq, h_scale)``;
- readers: ``triton_quant_fp8_linear_prequant(x, xq, x_scale, ...)`` and ``triton_linear_glu_fp8`` given
  ``xq``/``x_scale``.

Contract: ``(yq [R, K], y_scale [R, 1])`` is ``quantize_fp8_per_token(y)`` over the ``R`` rows of ``y``, but a
producer writes only one of the two forms: the one an fp8 linear multiplies at that many rows. The norms also
write ``y_scale`` beside the 16-bit form, and a reader told so (``scale_given``) hands it to the decode GEMV,
whose programs then skip their pass over the whole row for its maximum; the gated activation does not (its rows
are written by many programs), so the down projection's GEMV still takes that pass.
``reads_fp8(rows, k, dtype, device)`` is that choice: ``torch._scaled_mm`` on fp8 codes above
``FP8_GEMV_MAX_TOKENS`` rows on CUDA with 16-bit activations and 16-aligned K; the 16-bit form elsewhere (the
decode GEMV, which streams the weight against 16-bit activations, and the portable kernel). So a producer's
``y`` may be read only by this family's readers, whose weights have 16-aligned rows (``fuse_fp8_act_quant`` makes
sure). The numbers are those of the unfused ops: producer, ``fp8_quantize_rows`` of its output, ``_scaled_mm``.
"""

from __future__ import annotations

import torch

from ..quant_linear import FP8_DTYPE
from ._common import next_pow2
from .gemv import gemv
from .glu import glu_fp8_launch, glu_packed_launch
from .linear_glu import gemv_glu_applies
from .quant_linear import FP8_GEMV_MAX_TOKENS, W_FP8, _rows, fp8_linear, fp8_quantize_rows, scaled_mm_fp8
from .rmsnorm import MAX_ONE_PASS, rmsnorm_launch


def reads_fp8(rows: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an fp8 linear reading ``[rows, k]`` activations multiplies their fp8 codes (see the module doc)."""
    return (
        rows > FP8_GEMV_MAX_TOKENS and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        and k % 16 == 0
    )


def _num_rows(x: torch.Tensor) -> int:
    k = x.shape[-1]
    return x.numel() // k if k else 0


def _fp8_pair(rows: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((rows, k), dtype=FP8_DTYPE, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def _quantize_into(y: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """The two-launch form, for shapes the fused kernels do not take."""
    q, s = fp8_quantize_rows(_rows(y))
    codes.copy_(q)
    scales.copy_(s)


def _norm(x, residual, weight, eps, weight_offset, out, summed):
    k, rows = x.shape[-1], _num_rows(x)
    codes, scales = _fp8_pair(rows, k, x.device)
    fp8 = reads_fp8(rows, k, out.dtype, x.device)
    in_kernel = next_pow2(k) <= MAX_ONE_PASS  # else (long rows) the output, then its quantization
    rmsnorm_launch(x, weight, eps, weight_offset, out, residual=residual, summed=summed,
                   fp8_out=(codes, scales) if in_kernel and fp8 else None,
                   scale_out=scales if in_kernel and not fp8 else None)
    if fp8 and not in_kernel:
        _quantize_into(out, codes, scales)
    elif not in_kernel:
        scales.copy_(fp8_quantize_rows(_rows(out))[1])
    return codes, scales


@torch.library.custom_op("autodeploy::triton_rmsnorm_fp8", mutates_args=())
def triton_rmsnorm_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    codes, scales = _norm(x, None, weight, eps, weight_offset, out, None)
    return out, codes, scales


@triton_rmsnorm_fp8.register_fake
def _rmsnorm_fp8_fake(x, weight, eps, weight_offset=0.0):
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    return x.new_empty(x.shape), x.new_empty((rows, x.shape[-1]), dtype=FP8_DTYPE), x.new_empty((rows, 1),
                                                                                                 dtype=torch.float32)


@torch.library.custom_op("autodeploy::triton_fused_add_rmsnorm_fp8", mutates_args=())
def triton_fused_add_rmsnorm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    codes, scales = _norm(x, residual, weight, eps, weight_offset, out, summed)
    return out, summed, codes, scales


@triton_fused_add_rmsnorm_fp8.register_fake
def _fused_add_rmsnorm_fp8_fake(x, residual, weight, eps, weight_offset=0.0):
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    like = x.new_empty(x.shape, dtype=sum_dtype)
    return like, like.clone(), x.new_empty((rows, x.shape[-1]), dtype=FP8_DTYPE), x.new_empty((rows, 1),
                                                                                               dtype=torch.float32)


def _check_rows(weight: torch.Tensor) -> None:
    if weight.shape[0] % 16:
        raise ValueError(f"fp8 linear on pre-quantized activations: needs 16-aligned weight rows, got {weight.shape[0]}")


@torch.library.custom_op("autodeploy::triton_quant_fp8_linear_prequant", mutates_args=())
def triton_quant_fp8_linear_prequant(
    x: torch.Tensor,
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_given: bool = False,
) -> torch.Tensor:
    """``scale_given``: ``x_scale`` is written beside the 16-bit ``x`` too (a norm made them)."""
    k, rows, n = x.shape[-1], _num_rows(x), weight.shape[0]
    if reads_fp8(rows, k, x.dtype, x.device):
        _check_rows(weight)
        y = scaled_mm_fp8(xq, x_scale, weight, weight_scale, bias, x.dtype)
    else:
        y = fp8_linear(_rows(x), weight, weight_scale, bias, x_scale if scale_given else None)
    return y.view(*x.shape[:-1], n)


@triton_quant_fp8_linear_prequant.register_fake
def _linear_prequant_fake(x, xq, x_scale, weight, weight_scale, bias=None, scale_given=False):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("autodeploy::triton_linear_glu_fp8", mutates_args=())
def triton_linear_glu_fp8(
    x: torch.Tensor,
    xq: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    quantize_output: bool,
    scale_given: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``triton_linear_glu`` of fp8 weights (``[..., K] -> [..., N / 2]``), reading ``xq``/``x_scale`` when given
    (``scale_given``: ``x_scale`` also beside the 16-bit ``x``) and writing ``(hq [R, N / 2], h_scale [R, 1])``
    with ``quantize_output`` (else they have no rows)."""
    k, rows, n_out = x.shape[-1], _num_rows(x), weight.shape[0] // 2
    out = x.new_empty((rows, n_out))
    codes, scales = _fp8_pair(rows if quantize_output else 0, n_out, x.device)
    fp8_in = xq is not None and reads_fp8(rows, k, x.dtype, x.device)
    fp8_out = quantize_output and reads_fp8(rows, n_out, x.dtype, x.device)
    if not fp8_in and gemv_glu_applies(_rows(x), weight, "fp8", 0):  # decode GEMV, activation in its epilogue
        out = gemv(_rows(x), W_FP8, weight, weight_scale, None, bias, 0, glu_activation=activation,
                   x_scale=x_scale.view(-1) if scale_given else None)
        return out.view(*x.shape[:-1], n_out), codes, scales  # at these rows nothing reads codes (reads_fp8)
    if fp8_in:
        _check_rows(weight)
        gate_up = scaled_mm_fp8(xq, x_scale, weight, weight_scale, bias, x.dtype)
    else:
        gate_up = fp8_linear(_rows(x), weight, weight_scale, bias)
    if fp8_out:
        glu_fp8_launch(gate_up, activation, codes, scales)
    else:
        glu_packed_launch(gate_up, activation, out)
    return out.view(*x.shape[:-1], n_out), codes, scales


@triton_linear_glu_fp8.register_fake
def _linear_glu_fp8_fake(x, xq, x_scale, weight, weight_scale, bias, activation, quantize_output,
                         scale_given=False):
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    n_out = weight.shape[0] // 2
    fp8_rows = rows if quantize_output else 0
    return (x.new_empty((*x.shape[:-1], n_out)), x.new_empty((fp8_rows, n_out), dtype=FP8_DTYPE),
            x.new_empty((fp8_rows, 1), dtype=torch.float32))
