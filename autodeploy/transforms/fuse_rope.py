"""``fuse_rope``: RoPE runs on the chosen kernel backend (one kernel per rotated tensor).

Matches: every ``torch_rope``. Emits its backend twin (Triton on CUDA), which reads q/k views of a fused QKV
GEMM in place. ``fuse_rope_attention`` (cache_init) later moves the RoPE of q and k into the cached attention.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..custom_ops.kernel_backends import kernel_op
from .base import KernelBackendConfig, SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import find_nodes


@TransformRegistry.register("fuse_rope")
class FuseRope(Transform):
    preserves_node_values = True  # new nodes replace old ones; survivors compute what they did
    config_class = KernelBackendConfig

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        op = kernel_op("torch_rope", self.config.backend, ctx.device)
        if op is torch.ops.autodeploy.torch_rope.default:
            return TransformInfo(num_matches=0, details={"backend": "torch"})
        nodes = find_nodes(gm, torch.ops.autodeploy.torch_rope.default)
        for node in nodes:
            node.target = op
        return TransformInfo(num_matches=len(nodes), details={"backend": "triton"})
