"""Collectives as graph ops: ``autodeploy::all_reduce`` and ``autodeploy::all_gather``.

Both run over the model group (the default ``torch.distributed`` group, see ``process_group.py``) and return a
new tensor, so they sit in an FX graph like any other functional op; their fake kernels give the shapes to
export and shape propagation without a process group. On NCCL they are plain ``dist`` calls on the current
stream and are captured by CUDA graphs (the communicator is created at ``init_distributed``, never during a
capture); on CPU they run over gloo.

- ``all_reduce(x) -> sum over ranks of x`` (same shape); small CUDA messages of the dtypes it checked go through
  symmetric memory (``symm_all_reduce.py``) when ``init_distributed`` set it up, the rest to NCCL;
- ``all_gather(x, dim, world_size) -> cat([x_rank0, x_rank1, ...], dim)``; ``world_size`` is an argument so the
  fake kernel knows the output shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .symm_all_reduce import symm_all_reduce, symm_all_reduce_takes


@torch.library.custom_op("autodeploy::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if symm_all_reduce_takes(x):
        return symm_all_reduce(x.contiguous())
    out = x.contiguous().clone()
    dist.all_reduce(out)
    return out


@all_reduce.register_fake
def _all_reduce_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("autodeploy::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    dim = dim % x.dim()
    front = x.movedim(dim, 0).contiguous()  # [n, ...]: all_gather_into_tensor concatenates along dim 0
    out = front.new_empty((world_size * front.shape[0], *front.shape[1:]))
    dist.all_gather_into_tensor(out, front)
    return out.movedim(0, dim).contiguous()


@all_gather.register_fake
def _all_gather_fake(x, dim, world_size):
    shape = list(x.shape)
    shape[dim % x.dim()] *= world_size
    return x.new_empty(shape)
