"""Writes a model's weights as a pre-quantized checkpoint in a common Hugging Face layout (for tests).

``write_quantized_checkpoint(model, folder, layout, ...)`` quantizes every ``nn.Linear`` but the LM head with
the quantizer the layout's own tools use (round to nearest), saves ``model.safetensors`` and ``config.json``
with the matching ``quantization_config``, and returns ``{linear weight name: dequantized weight}`` so a test
can build the full-precision model the checkpoint stands for. It follows the formats as their libraries
store them and shares no code with autodeploy's readers (``autodeploy/models/quant_formats.py``):

- ``compressed-tensors``: float8_e4m3fn ``weight`` and float32 ``weight_scale`` ([N, 1] channel / [1] tensor).
- ``gptq`` (AutoGPTQ / optimum, ``checkpoint_format: gptq``): ``qweight`` [K/8, N] int32 packed along K,
  ``qzeros`` [G, N/8] packed along N holding zero - 1, ``scales`` [G, N] float16, ``g_idx`` [K].
- ``awq`` (AutoAWQ GEMM): ``qweight`` [K, N/8] and ``qzeros`` [G, N/8] int32 packed along N in the order
  0, 2, 4, 6, 1, 3, 5, 7; ``scales`` [G, N] float16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """[R, C] codes -> [R / 8, C] int32: row r of the result holds rows 8r..8r+7, row 8r+j in bits 4j."""
    r, c = codes.shape
    words = torch.zeros((r // 8, c), dtype=torch.int64)
    for j in range(8):
        words |= codes[j::8].to(torch.int64) << (4 * j)
    return words.to(torch.int32)  # wraps like the libraries' numpy uint32 -> int32 view


def _pack_cols(codes: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """[R, C] codes -> [R, C / 8] int32: nibble i of word w holds column 8w + order[i]."""
    order = order or list(range(8))
    r, c = codes.shape
    words = torch.zeros((r, c // 8), dtype=torch.int64)
    for i, col in enumerate(order):
        words |= codes[:, col::8].to(torch.int64) << (4 * i)
    return words.to(torch.int32)


def _groups(w: torch.Tensor, group_size: int) -> list[tuple[int, int]]:
    k = w.shape[1]
    g = k if group_size <= 0 else group_size
    return [(a, min(a + g, k)) for a in range(0, k, g)]


def _gptq(w: torch.Tensor, group_size: int, sym: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AutoGPTQ's round-to-nearest quantizer (the GPTQ update itself is not needed to test the layout)."""
    w = w.float()
    n, k = w.shape
    codes = torch.zeros((n, k), dtype=torch.int64)
    scales, zeros = [], []
    for a, b in _groups(w, group_size):
        block = w[:, a:b]
        xmin = block.amin(1).clamp(max=0)
        xmax = block.amax(1).clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin, xmax = torch.where(both_zero, -1.0, xmin), torch.where(both_zero, 1.0, xmax)
        scale = (xmax - xmin) / 15
        zero = torch.full_like(scale, 8.0) if sym else torch.round(-xmin / scale)
        codes[:, a:b] = torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, 15).long()
        scales.append(scale.half())
        zeros.append(zero.long())
    scales_t, zeros_t = torch.stack(scales), torch.stack(zeros)  # [G, N]
    idx = torch.arange(k) // (k if group_size <= 0 else group_size)
    deq = (codes - zeros_t[idx].t()).float() * scales_t[idx].t().float()
    tensors = {
        "qweight": _pack_rows(codes.t().contiguous()),
        "qzeros": _pack_cols(zeros_t - 1),
        "scales": scales_t,
        "g_idx": idx.to(torch.int32),
    }
    return tensors, deq


def _awq(w: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AutoAWQ's zero-point quantizer (without the activation-aware scale search)."""
    w = w.float()
    n, k = w.shape
    codes = torch.zeros((n, k), dtype=torch.int64)
    scales, zeros = [], []
    for a, b in _groups(w, group_size):
        block = w[:, a:b]
        max_val, min_val = block.amax(1), block.amin(1)
        scale = (max_val - min_val).clamp(min=1e-5) / 15
        zero = (-torch.round(min_val / scale)).clamp(0, 15)
        codes[:, a:b] = torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, 15).long()
        scales.append(scale.half())
        zeros.append(zero.long())
    scales_t, zeros_t = torch.stack(scales), torch.stack(zeros)
    idx = torch.arange(k) // (k if group_size <= 0 else group_size)
    deq = (codes - zeros_t[idx].t()).float() * scales_t[idx].t().float()
    tensors = {
        "qweight": _pack_cols(codes.t().contiguous(), _AWQ_PACK_ORDER),
        "qzeros": _pack_cols(zeros_t, _AWQ_PACK_ORDER),
        "scales": scales_t,
    }
    return tensors, deq


def _fp8(w: torch.Tensor, strategy: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    w = w.float()
    amax = w.abs().amax(1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
    scale = amax / 448.0
    weight = (w / (scale if strategy == "channel" else scale[0])).clamp(-448, 448).to(torch.float8_e4m3fn)
    deq = weight.float() * (scale if strategy == "channel" else scale[0])
    return {"weight": weight, "weight_scale": scale.float()}, deq


def _quantization_config(layout: str, options: dict[str, Any]) -> dict[str, Any]:
    if layout == "compressed-tensors":
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                "strategy": options.get("strategy", "channel")},
                    "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                          "strategy": "token"},
                }
            },
            "ignore": ["lm_head"],
        }
    if layout == "gptq":
        return {
            "quant_method": "gptq", "bits": 4, "group_size": options.get("group_size", 128),
            "desc_act": False, "sym": options.get("sym", True), "checkpoint_format": "gptq",
            "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
        }
    if layout == "awq":
        return {
            "quant_method": "awq", "bits": 4, "group_size": options.get("group_size", 128),
            "zero_point": True, "version": "gemm", "modules_to_not_convert": None,
        }
    raise ValueError(layout)


def write_quantized_checkpoint(
    model: torch.nn.Module, folder: Path, layout: str, tokenizer: Any = None, **options: Any
) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    dequantized: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        weight = state.pop(f"{name}.weight")
        if layout == "compressed-tensors":
            tensors, deq = _fp8(weight, options.get("strategy", "channel"))
        elif layout == "gptq":
            tensors, deq = _gptq(weight, options.get("group_size", 128), options.get("sym", True))
        else:
            tensors, deq = _awq(weight, options.get("group_size", 128))
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        dequantized[f"{name}.weight"] = deq.to(weight.dtype)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = _quantization_config(layout, options)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return dequantized
