"""Triton backends of the ``autodeploy::`` op families (one module per family; design notes in README.md).

Importing this package needs ``triton`` and registers every ``autodeploy::triton_*`` op. ``autodeploy.custom_ops``
never imports it, so the package works without Triton; callers import it when they pick the Triton backend.
On CPU the kernels run only under the interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported).

``TRITON_OPS`` maps each torch reference op to its Triton twin, for transforms that swap backends by name.
"""

from __future__ import annotations

from . import (  # noqa: F401
    cached_attention, fp8_activations, glu, linear, linear_glu, moe, moe_router, norm_linear, quant_linear, rmsnorm,
    rope,
)

#: reference op name -> Triton op name (both under ``torch.ops.autodeploy``)
TRITON_OPS: dict[str, str] = {
    "torch_cached_attention": "triton_cached_attention",
    "torch_rmsnorm": "triton_rmsnorm",
    "torch_fused_add_rmsnorm": "triton_fused_add_rmsnorm",
    "torch_rope": "triton_rope",
    "torch_glu_packed": "triton_glu_packed",
    "torch_moe": "triton_moe",
    "torch_moe_router": "triton_moe_router",
    "torch_quant_fp8_linear": "triton_quant_fp8_linear",
    "torch_quant_int8_linear": "triton_quant_int8_linear",
    "torch_quant_int4_linear": "triton_quant_int4_linear",
}
