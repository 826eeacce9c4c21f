"""Tensor parallelism on ``torch.distributed``: process groups, collectives as graph ops, launching ranks.

- ``process_group``: who this process is (``DistInfo``), joining the model (NCCL/gloo) and control (gloo) groups,
  torchrun detection, small host-side agreements (``min_across_ranks``, ``all_gather_objects``);
- ``collectives``: ``autodeploy::all_reduce`` and ``autodeploy::all_gather`` (torch references over
  ``torch.distributed``, fake kernels, CUDA-graph capturable on NCCL);
- ``fused_all_reduce``: ``autodeploy::all_reduce_add_rmsnorm``, the all-reduce with the residual add and RMSNorm
  after it (one kernel over symmetric memory on CUDA);
- ``launch``: ``spawn_workers`` starts ranks ``1..N-1`` next to the calling process (rank 0);
- ``channel`` + ``worker``: rank 0's ``RunnerProxy`` sends each step to the workers' ``serve_steps`` loops.

This package sits below everything else but the ops: it knows the model runner only by its ``execute`` method,
and ``fused_all_reduce`` launches a kernel of ``custom_ops`` (the add + RMSNorm it fuses).
"""

from . import collectives, fused_all_reduce  # noqa: F401  (registers autodeploy::all_reduce / all_gather / ...)
from .process_group import (
    DistInfo,
    control_group,
    current_dist_info,
    destroy_distributed,
    init_distributed,
    launched_by_torchrun,
    min_across_ranks,
    rank_device,
)

__all__ = [
    "DistInfo",
    "control_group",
    "current_dist_info",
    "destroy_distributed",
    "init_distributed",
    "launched_by_torchrun",
    "min_across_ranks",
    "rank_device",
]
