"""``quantize_int8_linear``: linears become ``autodeploy::<backend>_quant_int8_linear`` (int8 weights, 16-bit inputs).

Matches: every ``aten.linear`` with a parameter weight when ``quantize: int8_weight_only`` is set, except the
LM head (``quantize_lm_head``), MoE routers (``quantize_router``) and ``exclude`` patterns. Emits: the int8
linear with parameters ``weight`` [N, K] int8 (symmetric, -127..127) and ``weight_scale`` [N] float32 (per
output channel). Limits: no pre-quantized int8 checkpoint layout is read (quantize a full-precision checkpoint
instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from ..custom_ops.quant_linear import quantize_int8_weight
from ..models.quant_formats import CheckpointQuantization
from .base import SharedContext, TransformRegistry
from .quantization import LinearSite, QuantizeLinear, add_weight_hook, meta, swap_linear


def _args(x, attrs, bias):
    return (x, attrs["weight"], attrs["weight_scale"], bias)


@TransformRegistry.register("quantize_int8_linear")
class QuantizeInt8Linear(QuantizeLinear):
    fmt = "int8"
    flag = "int8_weight_only"
    reference_op = "torch_quant_int8_linear"

    def _quantize_site(
        self, gm: GraphModule, site: LinearSite, op: Any, ctx: SharedContext, ckpt: CheckpointQuantization | None
    ) -> None:
        n, k = site.out_features, site.in_features
        if not site.is_meta:
            weight, scale = quantize_int8_weight(site.weight.detach())
            swap_linear(gm, site, op, {"weight": weight, "weight_scale": scale}, _args)
            return
        swap_linear(gm, site, op, {"weight": meta((n, k), torch.int8), "weight_scale": meta((n,), torch.float32)}, _args)
        w_key, s_key, device = site.key("weight"), site.key("weight_scale"), ctx.device

        def quantize(t: torch.Tensor) -> dict[str, torch.Tensor]:
            weight, scale = quantize_int8_weight(t.to(device))
            return {w_key: weight, s_key: scale}

        add_weight_hook(gm, site.weight_key, quantize)
