"""Process groups for tensor parallelism: who this process is, how it joined, and the groups it talks over.

Two groups per process once ``init_distributed`` ran:

- the **model group** (the default group: NCCL on CUDA, gloo on CPU) carries the collectives inside the graph
  (``autodeploy::all_reduce`` / ``all_gather``) and the device tensors the engine hands to every rank;
- the **control group** (always gloo, on the host) carries the status exchanges while the engine is built.

A process joins in one of two ways: ``launch.spawn_workers`` starts ranks ``1..N-1`` next to the calling process
(rank 0) and they meet in a file store; under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) every process joins
through ``env://``. Tensor parallelism spans the whole world: there is no data or pipeline parallel group.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

logger = logging.getLogger("autodeploy.distributed")

#: how long a rank waits in a collective for the others before giving up (model build included)
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

_control_group: Any = None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the tensor-parallel world."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when ``torchrun`` (or any launcher using its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_dist_info() -> DistInfo:
    """``DistInfo`` from the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_dist_info() -> DistInfo:
    if not is_initialized():
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device a rank runs on: ``auto``/``cuda`` become ``cuda:<local_rank>``; anything else is taken as is."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank with local rank {local_rank} needs cuda:{local_rank}, but only "
                f"{torch.cuda.device_count()} CUDA devices are visible",
                hint="lower tensor_parallel_size or make more GPUs visible (CUDA_VISIBLE_DEVICES)",
            )
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(
    info: DistInfo,
    device: torch.device,
    init_method: str = "env://",
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    all_reduce: str = "nccl",
) -> None:
    """Join the model group (NCCL on CUDA, gloo otherwise) and create the gloo control group.

    ``all_reduce="auto"`` also sets up the symmetric-memory all-reduce for small CUDA messages
    (``symm_all_reduce.py``) and the all-reduce fused with the residual add and RMSNorm
    (``fused_all_reduce.py``); each on every rank or on none.
    """
    global _control_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend, init_method=init_method, rank=info.rank, world_size=info.world_size, timeout=timeout, **kwargs
        )
    elif dist.get_world_size() != info.world_size:
        raise ConfigError(
            f"torch.distributed is initialised with {dist.get_world_size()} ranks, but tensor_parallel_size is "
            f"{info.world_size}",
            hint="set tensor_parallel_size to the number of processes torchrun starts (--nproc-per-node x nodes)",
        )
    _control_group = dist.new_group(backend="gloo")  # apart from the model group even on CPU: no interleaving
    if device.type == "cuda":  # create the NCCL communicator now, not inside a CUDA-graph capture
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
        torch.cuda.synchronize(device)
        if all_reduce == "auto" and info.world_size > 1:
            from .fused_all_reduce import setup_fused_all_reduce
            from .symm_all_reduce import setup_symm_all_reduce

            setup_symm_all_reduce(device)
            setup_fused_all_reduce(device)
    logger.info("rank %d/%d joined (%s on %s)", info.rank, info.world_size, dist.get_backend(), device)


def control_group() -> Any:
    return _control_group if _control_group is not None else dist.group.WORLD


def destroy_distributed(timeout_s: float | None = None) -> bool:
    """Leave every group this process joined (no-op when none); ``True`` once done.

    With ``timeout_s`` the teardown runs in a daemon thread and this returns ``False`` if it has not finished by
    then (NCCL's teardown waits for every peer's; a caller that must not hang then stops the peers itself).
    """
    if timeout_s is None:
        _destroy()
        return True
    thread = threading.Thread(target=_destroy, name="autodeploy-destroy-distributed", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        logger.warning("leaving the process groups did not finish within %.0fs; going on without it", timeout_s)
        return False
    return True


def _destroy() -> None:
    global _control_group
    from .fused_all_reduce import teardown_fused_all_reduce
    from .symm_all_reduce import teardown_symm_all_reduce

    teardown_fused_all_reduce()
    teardown_symm_all_reduce()
    _control_group = None
    if is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a broken communicator must not stop the shutdown
            logger.warning("destroying the process group failed: %s", e)


def min_across_ranks(value: int) -> int:
    """The smallest ``value`` over all ranks (identity outside a multi-rank world)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control_group())
    return int(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, over the control group."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out
