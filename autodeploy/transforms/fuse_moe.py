"""``fuse_moe``: every mixture-of-experts block runs on the chosen kernel backend.

Matches: every ``autodeploy::torch_moe`` (what export routing or ``match_moe`` made of the experts). Emits its
backend twin with the same arguments: ``triton_moe`` (sorted/aligned routing, two grouped GEMMs with the
activation, biases and routing weight fused, a deterministic top-k sum; ``custom_ops/triton/moe.py``) when the
backend is ``triton`` or ``auto`` on CUDA; on ``torch`` (``auto`` on CPU) the reference stays. The router
(``fuse_moe_router`` fuses a softmax top-k one) and shared experts (a dense MLP beside the experts, as in
Qwen2-MoE) stay as the model wrote them.
After ``shard_moe`` (sharding runs before fusion) the op's arguments are this rank's share and the swap is the
same: expert mode leaves ``E / N`` local experts and shifted ids, the other ranks' experts falling outside
``[0, E / N)``, which the kernel skips like the reference; tensor mode leaves every expert's slice of the
intermediate size (any weight strides are read in place).

Limits: the Triton kernel takes bf16, fp16 or fp32 weights in the activations' dtype, or float8 weights with
their per-row scales (``quantize_fp8_moe``); a ``torch_moe`` with anything else stays (listed in
``details["kept"]``). The torch reference syncs with the host per expert, so a graph that keeps it cannot be
captured in CUDA graphs.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.kernel_backends import kernel_op
from ..custom_ops.quant_linear import FP8_DTYPE
from .base import KernelBackendConfig, SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes, node_val, op_arguments

TORCH_MOE = torch.ops.autodeploy.torch_moe.default
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@TransformRegistry.register("fuse_moe")
class FuseMoe(Transform):
    config_class = KernelBackendConfig
    requires_shape_prop = False  # same arguments and output, only the target changes

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        nodes = find_nodes(gm, TORCH_MOE)
        if not nodes:
            return TransformInfo(num_matches=0, details={"backend": None})
        op = kernel_op("torch_moe", self.config.backend, ctx.device)
        if op is TORCH_MOE:
            return TransformInfo(num_matches=0, details={"backend": "torch", "moe_layers": len(nodes)})
        swapped, kept = 0, []
        for node in nodes:
            if _kernel_can_run(node):
                node.target = op
                swapped += 1
            else:
                kept.append(node.name)
        details = {"backend": "triton", **({"kept": kept} if kept else {})}
        return TransformInfo(num_matches=swapped, details=details)


def _kernel_can_run(node: Node) -> bool:
    """Activations in a dtype the kernel takes and expert weights in the same one, or float8 with their scales
    (``quantize_fp8_moe``); assumed without fake values."""
    args = op_arguments(node)
    x, w_up, w_down = (node_val(args[name]) for name in ("x", "w_up", "w_down"))
    if x is None or w_up is None or w_down is None:
        return True
    weight_dtype = FP8_DTYPE if args["w_up_scale"] is not None else x.dtype
    return x.dtype in KERNEL_DTYPES and w_up.dtype == weight_dtype and w_down.dtype == weight_dtype
