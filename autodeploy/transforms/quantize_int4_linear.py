"""``quantize_int4_linear``: linears become ``autodeploy::<backend>_quant_int4_linear`` (group-wise int4 weights).

Matches: every ``aten.linear`` with a parameter weight when ``quantize: int4_weight_only`` is set (all but the
LM head, MoE routers and ``exclude``), or the linears a GPTQ / AWQ checkpoint stores as 4-bit (``qweight``).
Emits: the int4 linear with parameters ``qweight`` [N, Kp/8] int32 (planar packing, ``custom_ops/quant_linear.py``),
``scales`` [G, N] float16 and, when asymmetric, ``qzeros`` [G, N] float16 (float zero points). From a flag:
round-to-nearest with ``group_size`` (default 128; -1 = per channel), asymmetric unless ``symmetric``. From
a checkpoint: its tensors are repacked at load time, never dequantized. Limits: GPTQ act-order
(``desc_act``) checkpoints are rejected; tied LM heads stay in full precision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from ..custom_ops.quant_linear import int4_num_groups, int4_padded_k, quantize_int4_weight
from ..models import quant_formats
from ..models.quant_formats import CheckpointQuantization
from .base import SharedContext, TransformRegistry
from .quantization import LinearSite, QuantizeLinear, QuantizeLinearConfig, add_weight_hook, meta, swap_linear


class QuantizeInt4LinearConfig(QuantizeLinearConfig):
    group_size: int = 128
    symmetric: bool = False


def _args_for(group_size: int):
    def make(x, attrs, bias):
        return (x, attrs["qweight"], attrs["scales"], attrs.get("qzeros"), bias, group_size)

    return make


@TransformRegistry.register("quantize_int4_linear")
class QuantizeInt4Linear(QuantizeLinear):
    config_class = QuantizeInt4LinearConfig
    fmt = "int4"
    flag = "int4_weight_only"
    reference_op = "torch_quant_int4_linear"

    def _stored_marker(self, ckpt: CheckpointQuantization) -> str:
        return "qweight"

    def _quantize_site(
        self, gm: GraphModule, site: LinearSite, op: Any, ctx: SharedContext, ckpt: CheckpointQuantization | None
    ) -> None:
        n, k = site.out_features, site.in_features
        group = ckpt.group_size if ckpt is not None else self.config.group_size
        symmetric = ckpt.symmetric if ckpt is not None else self.config.symmetric
        make_args = _args_for(group)
        if not site.is_meta:
            qweight, scales, zeros = quantize_int4_weight(site.weight.detach(), group, symmetric)
            params = {"qweight": qweight, "scales": scales}
            if zeros is not None:
                params["qzeros"] = zeros
            swap_linear(gm, site, op, params, make_args)
            return
        groups = int4_num_groups(k, group)
        params = {"qweight": meta((n, int4_padded_k(k) // 8), torch.int32), "scales": meta((groups, n), torch.float16)}
        if not symmetric:
            params["qzeros"] = meta((groups, n), torch.float16)
        swap_linear(gm, site, op, params, make_args)
        q_key, s_key, z_key = site.key("qweight"), site.key("scales"), site.key("qzeros")
        if ckpt is None:  # full-precision checkpoint: quantize each weight as it arrives
            device = ctx.device

            def quantize(t: torch.Tensor) -> dict[str, torch.Tensor]:
                qweight, scales, zeros = quantize_int4_weight(t.to(device), group, symmetric)
                out = {q_key: qweight, s_key: scales}
                if zeros is not None:
                    out[z_key] = zeros
                return out

            add_weight_hook(gm, site.weight_key, quantize)
            return
        add_weight_hook(gm, s_key, lambda t: {s_key: quant_formats.int4_scales(t, k, group)})
        if ckpt.method == "gptq":
            add_weight_hook(gm, q_key, lambda t: {q_key: quant_formats.gptq_qweight(t, k)})
            if not symmetric:
                offset = ckpt.zero_offset
                add_weight_hook(gm, z_key, lambda t: {z_key: quant_formats.gptq_qzeros(t, n, k, group, offset)})
        else:
            add_weight_hook(gm, q_key, lambda t: {q_key: quant_formats.awq_qweight(t, n)})
            if not symmetric:
                add_weight_hook(gm, z_key, lambda t: {z_key: quant_formats.awq_qzeros(t, n, k, group)})
