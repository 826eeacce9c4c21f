"""Pre-quantized checkpoints: their ``quantization_config`` and how their tensors map onto autodeploy's layouts.

``checkpoint_quantization(hf_config)`` reads ``config.quantization_config`` into a ``CheckpointQuantization``
(or ``None`` for an unquantized model; an unsupported method raises). The converters below turn one stored
tensor into the layout of ``custom_ops/quant_linear.py``; the ``quantize_*`` transforms register them as
weight-load hooks, so each tensor is repacked as it streams in and nothing is dequantized.

Supported layouts (every quantized linear is ``y = x W^T``, ``W [N, K]``):

- ``compressed-tensors`` float8 (formats ``float-quantized`` / ``naive-quantized``): ``weight`` [N, K]
  float8_e4m3fn, ``weight_scale`` [N, 1] (strategy ``channel``) or [1] / [] (``tensor``). Activations are
  always quantized dynamically per token; a static ``input_scale`` is not used. ``fbgemm_fp8`` has the same
  tensors (channel-wise).
- ``gptq`` 4-bit, ``desc_act: false`` (``g_idx`` is then ``k // group_size`` and is not read): ``qweight``
  [K/8, N] int32 (8 codes along K per word, code ``k % 8`` in bits ``4 (k % 8)``), ``qzeros`` [G, N/8] int32
  (8 zero points along N per word; ``checkpoint_format: gptq`` stores zero - 1), ``scales`` [G, N] float16.
  ``sym: true`` means every zero point is 8, so ``qzeros`` is not read.
- ``awq`` 4-bit, ``version: gemm``: ``qweight`` [K, N/8] int32 and ``qzeros`` [G, N/8] int32 with 8 codes along
  N per word in the interleaved order (word nibble ``i`` holds column ``AWQ_ORDER[i]``), ``scales`` [G, N].
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..custom_ops.quant_linear import FP8_DTYPE, int4_num_groups, pack_int4
from ..errors import ConfigError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word nibble i holds column AWQ_ORDER[i] of its 8
_AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(c) for c in range(8))


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's ``quantization_config`` says, reduced to what the transforms need."""

    method: Literal["compressed-tensors", "fbgemm_fp8", "gptq", "awq"]
    fmt: Literal["fp8", "int4"]
    per_channel: bool = True  # fp8 weight scales
    group_size: int = 128  # int4; -1 = one group per output channel
    symmetric: bool = True  # int4: zero point 8, no qzeros
    zero_offset: int = 0  # gptq v1 stores zero - 1
    ignore: tuple[str, ...] = field(default_factory=tuple)  # module names or "re:<regex>" left unquantized

    def ignores(self, module: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return True
            elif module == pattern or module.endswith("." + pattern):
                return True
        return False


def _unsupported(what: str, raw: dict[str, Any]) -> ConfigError:
    return ConfigError(
        f"the checkpoint's quantization is not supported: {what} (quantization_config={raw})",
        hint="supported: compressed-tensors / fbgemm float8, GPTQ 4-bit (desc_act false), AWQ 4-bit GEMM; "
        "or load an unquantized checkpoint and set quantize=fp8|int8_weight_only|int4_weight_only",
    )


def _compressed_tensors(raw: dict[str, Any]) -> CheckpointQuantization:
    groups = list((raw.get("config_groups") or {}).values())
    if raw.get("format") not in ("float-quantized", "naive-quantized") or not groups:
        raise _unsupported(f"compressed-tensors format {raw.get('format')!r}", raw)
    strategies = set()
    for group in groups:
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise _unsupported("compressed-tensors weights other than float8", raw)
        strategies.add(weights.get("strategy", "tensor"))
    if not strategies <= {"tensor", "channel"}:
        raise _unsupported(f"float8 weight strategy {sorted(strategies)} (tensor and channel are)", raw)
    return CheckpointQuantization(
        "compressed-tensors", "fp8", per_channel="channel" in strategies, ignore=tuple(raw.get("ignore") or ())
    )


def checkpoint_quantization(hf_config: Any) -> CheckpointQuantization | None:
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        return None
    raw = raw if isinstance(raw, dict) else raw.to_dict()
    method = str(raw.get("quant_method", "")).lower().replace("_", "-")
    if method == "compressed-tensors":
        return _compressed_tensors(raw)
    if method == "fbgemm-fp8":
        return CheckpointQuantization("fbgemm_fp8", "fp8", ignore=tuple(raw.get("modules_to_not_convert") or ()))
    if method in ("gptq", "awq"):
        if raw.get("bits") != 4:
            raise _unsupported(f"{method} with {raw.get('bits')} bits (4 are)", raw)
        ignore = tuple(raw.get("modules_to_not_convert") or ())
        if method == "gptq":
            if raw.get("desc_act"):
                raise _unsupported("GPTQ with desc_act (act-order) true", raw)
            version = raw.get("checkpoint_format", "gptq")
            if version not in ("gptq", "gptq_v2"):
                raise _unsupported(f"GPTQ checkpoint_format {version!r}", raw)
            return CheckpointQuantization(
                "gptq", "int4", group_size=int(raw.get("group_size", 128)), symmetric=bool(raw.get("sym", True)),
                zero_offset=1 if version == "gptq" else 0, ignore=ignore,
            )
        if str(raw.get("version", "gemm")).lower() != "gemm":
            raise _unsupported(f"AWQ version {raw.get('version')!r} (gemm is)", raw)
        return CheckpointQuantization(
            "awq", "int4", group_size=int(raw.get("group_size", 128)),
            symmetric=not raw.get("zero_point", True), ignore=ignore,
        )
    if method == "gguf":
        return None  # transformers dequantizes GGUF files itself
    raise _unsupported(f"quant_method {raw.get('quant_method')!r}", raw)


# ---- tensor converters (stored tensor -> autodeploy layout) ---------------------------------------------------------
def fp8_weight(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == FP8_DTYPE else t.float().clamp(-448.0, 448.0).to(FP8_DTYPE)


def fp8_weight_scale(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N, 1], [N], [1] or [] -> [N] float32."""
    t = t.float().reshape(-1)
    return t.expand(n).contiguous() if t.numel() == 1 else t.reshape(n).contiguous()


def _unpack_words(words: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 ``[..., W]`` -> codes ``[..., 8 W]``: element ``8 w + c`` from nibble ``c`` (or ``order``'s) of word ``w``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    codes = (words.to(torch.int32)[..., None] >> shifts) & 0xF  # [..., W, 8 nibbles]
    if order is not None:
        codes = codes[..., list(order)]
    return codes.reshape(*words.shape[:-1], words.shape[-1] * 8)


def _pad_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """``[G, N]`` per-group rows, padded (zeros) to the groups that cover the padded K."""
    rows = int4_num_groups(k, group_size)
    if t.shape[0] > rows:
        raise ValueError(f"{t.shape[0]} groups for K={k} and group size {group_size} (expected <= {rows})")
    out = torch.zeros((rows, t.shape[1]), dtype=torch.float16)
    out[: t.shape[0]] = t.to(torch.float16)
    return out


def int4_scales(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    return _pad_groups(t, k, group_size)


def gptq_qweight(t: torch.Tensor, k: int) -> torch.Tensor:
    """GPTQ ``qweight [K/8, N]`` -> planar ``[N, Kp/8]``."""
    codes = _unpack_words(t.t().contiguous())  # [N, K]
    return pack_int4(codes[:, :k])


def gptq_qzeros(t: torch.Tensor, n: int, k: int, group_size: int, zero_offset: int) -> torch.Tensor:
    zeros = _unpack_words(t)[:, :n].float() + zero_offset  # [G, N]
    return _pad_groups(zeros, k, group_size)


def awq_qweight(t: torch.Tensor, n: int) -> torch.Tensor:
    """AWQ ``qweight [K, N/8]`` -> planar ``[N, Kp/8]``."""
    codes = _unpack_words(t, _AWQ_NIBBLE_OF_COLUMN)[:, :n]  # [K, N]
    return pack_int4(codes.t().contiguous())


def awq_qzeros(t: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    zeros = _unpack_words(t, _AWQ_NIBBLE_OF_COLUMN)[:, :n].float()
    return _pad_groups(zeros, k, group_size)
