"""Functions tensor-parallel tests run on every rank (``RunnerProxy.call_on_all_ranks``) and a failing transform.

They live in an importable module because spawned worker ranks receive them pickled by name.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autodeploy.errors import TransformError
from autodeploy.transforms import SharedContext, Transform, TransformInfo, TransformRegistry


def parameter_bytes(runner) -> int:
    return sum(p.numel() * p.element_size() for p in runner.gm.parameters())


def kv_heads(runner) -> list[int]:
    return [layer.num_kv_heads for layer in runner.spec.layers]


def weight_hooks(runner) -> int:
    """How many parameters this rank sliced while they streamed in from the checkpoint."""
    return len(getattr(runner.gm, "_autodeploy_param_hooks", {}))


def collective_ops(runner) -> dict[str, int]:
    """How many all-reduces the rank's graph runs alone and how many joined the add + RMSNorm after them."""
    targets = {"all_reduce": torch.ops.autodeploy.all_reduce.default,
               "all_reduce_add_rmsnorm": torch.ops.autodeploy.all_reduce_add_rmsnorm.default}
    nodes = list(runner.gm.graph.nodes)
    return {name: sum(n.target is target for n in nodes) for name, target in targets.items()}


def rank(runner) -> int:
    return dist.get_rank()


def break_next_step_on_rank1(runner) -> None:
    if dist.get_rank() != 1:
        return

    def execute(*args, **kwargs):
        raise RuntimeError("injected failure in rank 1's step")

    runner.execute = execute


@TransformRegistry.register("fail_on_rank1")
class FailOnRank1(Transform):
    """Raises on rank 1 only (a rank-local build failure)."""

    def _apply(self, gm: torch.fx.GraphModule, ctx: SharedContext) -> TransformInfo:
        if ctx.rank == 1:
            raise TransformError("rank 1 cannot build this graph", where="fail_on_rank1", hint="it never can")
        return TransformInfo(num_matches=0)
