"""``gemv_linears``: 16-bit linears run ``autodeploy::triton_linear`` (the decode GEMV at one token, cuBLAS above).

Matches: every ``aten.linear`` whose weight is a loaded 2-D ``get_attr`` parameter in bf16, fp16 or fp32, the LM
head included (this runs after ``gather_logits``, which finds the head as an ``aten.linear``). Emits
``triton_linear`` with the same arguments (``custom_ops/triton/linear.py``): at one token it streams the weight
with the GEMV of ``custom_ops/triton/gemv.py`` (about 4% faster than cuBLAS on Llama-3.1-8B's layers, H100),
otherwise it calls ``F.linear``. On ``torch`` (``auto`` without CUDA) the graph is left alone.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..custom_ops.kernel_backends import resolve_kernel_backend
from .base import KernelBackendConfig, SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, get_attr_value

LINEAR = torch.ops.aten.linear.default
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@TransformRegistry.register("gemv_linears")
class GemvLinears(Transform):
    config_class = KernelBackendConfig
    requires_shape_prop = False  # same arguments and output, only the target changes

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        if resolve_kernel_backend(self.config.backend, ctx.device) != "triton":
            return TransformInfo(num_matches=0, details={"backend": "torch"})
        from ..custom_ops.triton import linear  # noqa: F401  (registers autodeploy::triton_linear)

        swapped = 0
        for node in find_nodes(gm, LINEAR):
            weight = node.args[1]
            if getattr(weight, "op", None) != "get_attr":
                continue
            value = get_attr_value(gm, weight)
            if value.is_meta or value.dim() != 2 or value.dtype not in WEIGHT_DTYPES:
                continue
            node.target = torch.ops.autodeploy.triton_linear.default
            swapped += 1
        return TransformInfo(num_matches=swapped, details={"backend": "triton"})
