"""All-reduce of small messages through symmetric memory: one kernel, peer loads over NVLink, no NCCL.

A decode step's all-reduce carries a few KB (batch 1 of Llama-3.1-8B: 8 KB) and runs twice per layer, so its
latency, not bandwidth, is what tensor parallelism pays. ``torch.distributed._symmetric_memory`` maps one buffer
of every rank into the address space of the others; ``symm_mem::one_shot_all_reduce_copy`` copies the local
input into this rank's buffer and, after a barrier over the signal pads, sums every rank's buffer in one kernel.
It is CUDA-graph capturable and the same buffer serves every call (the op's barriers order the reuse).

``setup_symm_all_reduce`` runs once per rank right after the model group exists (every rank calls it: the
rendezvous is collective). It allocates the buffer, checks the op's result against the known sum for each
candidate dtype, and the ranks agree over the control group; any failure on any rank leaves every rank on NCCL
(a dtype the op does not take, e.g. float16 in torch 2.11, stays on NCCL alone), with a warning.
``autodeploy::all_reduce`` then sends CUDA messages of a checked dtype and at most ``max_bytes`` here, the rest
to NCCL (``symm_all_reduce_takes``).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist

from .process_group import min_across_ranks

logger = logging.getLogger("autodeploy.distributed")

DEFAULT_MAX_BYTES = 4 << 20  # decode batches up to 256 x 4096 bf16 hidden states; prefill goes to NCCL
CANDIDATE_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
_state: dict = {}


def symm_all_reduce_bytes() -> int:
    """The largest message the symmetric-memory path takes (0 when it is off)."""
    return _state.get("max_bytes", 0)


def symm_all_reduce_takes(x: torch.Tensor) -> bool:
    """Whether ``autodeploy::all_reduce`` sends ``x`` through symmetric memory."""
    return (
        x.is_cuda and x.dtype in _state.get("dtypes", ()) and 0 < x.numel() * x.element_size() <= _state["max_bytes"]
    )


def symm_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks (contiguous, ``x.nbytes <= symm_all_reduce_bytes()``), a new tensor."""
    buf = _state["buffer"][: x.numel() * x.element_size()].view(x.dtype)
    flat = x.reshape(-1)
    ops = torch.ops.symm_mem
    if hasattr(ops, "one_shot_all_reduce_copy"):
        out = ops.one_shot_all_reduce_copy(buf, flat, "sum", _state["group"])
    else:
        buf.copy_(flat)
        out = ops.one_shot_all_reduce(buf, "sum", _state["group"])
    return out.view(x.shape)


def agree(ok: bool, what: str, error: BaseException | None, fallback: str = "NCCL carries every all-reduce") -> bool:
    """Every rank's ``ok`` and'ed; a failure is logged by the rank that saw it, with what happens instead."""
    if error is not None:
        logger.warning("%s failed (%s); %s", what, error, fallback)
    return bool(min_across_ranks(int(ok)))


def setup_symm_all_reduce(device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Enable the symmetric-memory path on every rank, or on none; returns whether it is on."""
    _state.clear()
    if device.type != "cuda" or dist.get_world_size() == 1:
        return False
    group = dist.group.WORLD.group_name
    buffer, error = None, None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch; deprecated (a no-op) since
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(group)
        buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
    except Exception as e:
        error = e
    if not agree(buffer is not None, "symmetric-memory all-reduce: allocating the buffer", error):
        return False
    try:
        symm_mem.rendezvous(buffer, group)
    except Exception as e:
        error = e
    if not agree(error is None, "symmetric-memory all-reduce: the rendezvous", error):
        return False
    _state.update(buffer=buffer, group=group, max_bytes=max_bytes)
    dtypes = [dtype for dtype in CANDIDATE_DTYPES if _self_test(device, dtype)]
    if not dtypes:
        _state.clear()
        return False
    _state["dtypes"] = frozenset(dtypes)
    logger.info("all-reduce of up to %d bytes of %s through symmetric memory", max_bytes, dtypes)
    return True


def _self_test(device: torch.device, dtype: torch.dtype) -> bool:
    """The op on ``dtype`` gives the known sum on every rank (each contributes rank + 1)."""
    ok, error = False, None
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        probe = torch.full((1000,), float(rank + 1), dtype=dtype, device=device)
        ok = bool((symm_all_reduce(probe) == world * (world + 1) / 2).all().item())
        error = None if ok else RuntimeError("wrong sum")
    except Exception as e:
        error = e
    if error is not None and dtype != torch.bfloat16:  # an op without this dtype is expected, not a warning
        logger.info("symmetric-memory all-reduce: no %s (%s); NCCL carries it", dtype, error)
        error = None
    return agree(ok, f"symmetric-memory all-reduce: the {dtype} self-test", error)


def teardown_symm_all_reduce() -> None:
    _state.clear()
