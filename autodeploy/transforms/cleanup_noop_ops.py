"""``cleanup_noop_ops``: remove nodes that compute nothing (see ``export/cleanup.py`` for the list).

Matches: metadata assertions, same-dtype/device casts, full slices, same-shape views/expands, inverse
transpose pairs, eval-mode dropout, aliases. Emits nothing. Runs first so patterns see the canonical form.
"""

from __future__ import annotations

from torch.fx import GraphModule

from ..export.cleanup import remove_noop_ops
from .base import SharedContext, Transform, TransformInfo, TransformRegistry


@TransformRegistry.register("cleanup_noop_ops")
class CleanupNoopOps(Transform):
    preserves_node_values = True  # new nodes replace old ones; survivors compute what they did

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        return TransformInfo(num_matches=remove_noop_ops(gm))
