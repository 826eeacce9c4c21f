"""``quantize_fp8_linear``: linears become ``autodeploy::<backend>_quant_fp8_linear`` (fp8 weights and activations).

Matches: every ``aten.linear`` with a parameter weight, when ``quantize: fp8`` is set (all but the LM head, MoE
routers and ``exclude``) or the checkpoint is float8 (compressed-tensors / fbgemm_fp8: the linears it stores as
fp8).
Emits: the fp8 linear with parameters ``weight`` [N, K] float8_e4m3fn and ``weight_scale`` [N] float32 (a
per-tensor scale is stored broadcast); activations are quantized per token at run time. From a flag, the
weight scale is per output channel (``per_channel: false``: one per tensor). Limits: tied LM heads stay in
full precision; static activation scales of a checkpoint are not used (dynamic per-token instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from ..custom_ops.quant_linear import FP8_DTYPE, quantize_fp8_weight
from ..models import quant_formats
from ..models.quant_formats import CheckpointQuantization
from .base import SharedContext, TransformRegistry
from .quantization import LinearSite, QuantizeLinear, QuantizeLinearConfig, add_weight_hook, meta, swap_linear


class QuantizeFP8LinearConfig(QuantizeLinearConfig):
    per_channel: bool = True


def _args(x, attrs, bias):
    return (x, attrs["weight"], attrs["weight_scale"], bias)


@TransformRegistry.register("quantize_fp8_linear")
class QuantizeFP8Linear(QuantizeLinear):
    config_class = QuantizeFP8LinearConfig
    fmt = "fp8"
    flag = "fp8"
    reference_op = "torch_quant_fp8_linear"

    def _stored_marker(self, ckpt: CheckpointQuantization) -> str:
        return "weight_scale"

    def _quantize_site(
        self, gm: GraphModule, site: LinearSite, op: Any, ctx: SharedContext, ckpt: CheckpointQuantization | None
    ) -> None:
        n, k = site.out_features, site.in_features
        per_channel = ckpt.per_channel if ckpt is not None else self.config.per_channel
        if not site.is_meta:
            weight, scale = quantize_fp8_weight(site.weight.detach(), per_channel)
            swap_linear(gm, site, op, {"weight": weight, "weight_scale": scale}, _args)
            return
        swap_linear(gm, site, op, {"weight": meta((n, k), FP8_DTYPE), "weight_scale": meta((n,), torch.float32)}, _args)
        w_key, s_key = site.key("weight"), site.key("weight_scale")
        if ckpt is None:  # full-precision checkpoint: quantize each weight as it arrives
            device = ctx.device

            def quantize(t: torch.Tensor) -> dict[str, torch.Tensor]:
                weight, scale = quantize_fp8_weight(t.to(device), per_channel)
                return {w_key: weight, s_key: scale}

            add_weight_hook(gm, site.weight_key, quantize)
        else:
            add_weight_hook(gm, w_key, lambda t: {w_key: quant_formats.fp8_weight(t)})
            add_weight_hook(gm, s_key, lambda t: {s_key: quant_formats.fp8_weight_scale(t, n)})
