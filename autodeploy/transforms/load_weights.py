"""``load_weights``: fill the graph's parameters that are still on the meta device from the checkpoint.

Runs after quantization and sharding (whose load hooks reshape each tensor as it streams in) and before
fusion. Moves the graph to the engine's device, including device literals left by an export on the meta
device. Emits no ops; a parameter left on the meta device afterwards is an error naming it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..errors import ModelLoadError
from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .graph import node_val, placeholders, set_graph_device


def _move_placeholder_vals(gm: GraphModule, device: torch.device) -> None:
    """The graph's example inputs follow the weights (a graph exported on meta would fail later shape props)."""
    for node in placeholders(gm):
        val = node_val(node)
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode") and val.device != device:
            with val.fake_mode:
                node.meta["val"] = val.to(device)


@TransformRegistry.register("load_weights")
class LoadWeights(Transform):
    requires_shape_prop = False

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        loaded = ctx.factory.load_weights(gm) if ctx.factory is not None else 0
        still_meta = [n for n, t in [*gm.named_parameters(), *gm.named_buffers()] if t.is_meta]
        if still_meta:
            raise ModelLoadError(
                f"{len(still_meta)} weights have no values after loading: {', '.join(still_meta[:5])}",
                where="load_weights",
                hint="pass a model with weights, a checkpoint folder, or random_weights=True",
            )
        gm.to(ctx.device)
        retargeted = set_graph_device(gm, ctx.device)
        _move_placeholder_vals(gm, ctx.device)
        return TransformInfo(num_matches=0, details={"loaded": loaded, "device_literals_retargeted": retargeted})
