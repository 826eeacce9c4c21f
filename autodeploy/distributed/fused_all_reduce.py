"""``autodeploy::all_reduce_add_rmsnorm``: a row-parallel block's all-reduce with the residual add and RMSNorm after it.

``all_reduce_add_rmsnorm(x, residual, weight, eps, weight_offset) -> (normed, summed)`` computes
``torch_fused_add_rmsnorm(all_reduce(x), residual, weight, eps, weight_offset)``. With peer buffers set up
(``setup_fused_all_reduce``, by ``init_distributed`` under ``all_reduce="auto"`` on CUDA) a message that fits one
slot runs as one Triton kernel (``custom_ops/triton/all_reduce_rmsnorm.py``): at decode that is one launch where
there were two, twice a layer. Anything else takes ``all_reduce`` and then the fused add + norm of the device's
kernel backend.

Setup is collective and all-or-nothing, like ``symm_all_reduce.py``: every rank allocates the symmetric buffer,
compiles the kernel and runs a self-test against the known sum, and the ranks agree over the control group
before any of them launches the kernel for real (a rank spinning on a peer that never comes would hang).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..custom_ops.kernel_backends import kernel_op
from ..custom_ops.rmsnorm import fused_add_rmsnorm_reference
from .collectives import all_reduce
from .process_group import control_group
from .symm_all_reduce import agree

UNFUSED = "the all-reduce, residual add and RMSNorm run as separate kernels"
logger = logging.getLogger("autodeploy.distributed")

DEFAULT_SLOT_BYTES = 1 << 20  # decode batches up to 128 x 4096 bf16 hidden states
_state: dict = {}


@torch.library.custom_op("autodeploy::all_reduce_add_rmsnorm", mutates_args=())
def all_reduce_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    peers = _state.get("peers")
    if peers is not None and x.is_cuda and x.dtype in _state["dtypes"] and peers.takes(x):
        from ..custom_ops.triton.all_reduce_rmsnorm import all_reduce_rmsnorm_launch

        return all_reduce_rmsnorm_launch(x, residual, weight, eps, weight_offset, peers)
    add_rmsnorm = kernel_op("torch_fused_add_rmsnorm", "auto", x.device)
    return add_rmsnorm(all_reduce(x), residual, weight, eps, weight_offset)


@all_reduce_add_rmsnorm.register_fake
def _all_reduce_add_rmsnorm_fake(x, residual, weight, eps, weight_offset=0.0):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype)


def fused_all_reduce_on() -> bool:
    return "peers" in _state


def setup_fused_all_reduce(device: torch.device, slot_bytes: int = DEFAULT_SLOT_BYTES) -> bool:
    """Peer buffers for the fused kernel on every rank, or on none; returns whether they are on."""
    _state.clear()
    if device.type != "cuda" or dist.get_world_size() == 1:
        return False
    peers, error = None, None
    try:
        peers, handle = _allocate(device, slot_bytes)
    except Exception as e:
        error = e
    if not agree(peers is not None, "allocating the fused all-reduce's buffers", error, UNFUSED):
        return False
    dist.barrier(group=control_group())  # every rank's flags are zero before any peer raises one
    error = None
    try:
        _self_test(peers, torch.bfloat16, compile_only=True)
    except Exception as e:
        error = e
    if not agree(error is None, "compiling the fused all-reduce", error, UNFUSED):
        return False
    dtypes = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ok, error = False, None
        try:
            ok = _self_test(peers, dtype)
            error = None if ok else RuntimeError("wrong result")
        except Exception as e:
            error = e
        if agree(ok, f"the fused all-reduce's {dtype} self-test", error, f"{dtype} runs unfused"):
            dtypes.append(dtype)
    if not dtypes:
        return False
    _state.update(peers=peers, handle=handle, dtypes=frozenset(dtypes))
    logger.info("all-reduce + add + RMSNorm in one kernel for messages up to %d bytes of %s", slot_bytes, dtypes)
    return True


def _allocate(device: torch.device, slot_bytes: int):
    import torch.distributed._symmetric_memory as symm_mem

    from ..custom_ops.triton.all_reduce_rmsnorm import PeerBuffers, data_region_bytes, flag_table_bytes

    world, rank = dist.get_world_size(), dist.get_rank()
    flags = flag_table_bytes(world)
    size = flags + data_region_bytes(world, slot_bytes)
    buffer = symm_mem.empty(size, dtype=torch.uint8, device=device)
    buffer.zero_()
    handle = symm_mem.rendezvous(buffer, dist.group.WORLD.group_name)
    addresses = [handle.get_buffer(r, (size,), torch.uint8).data_ptr() for r in range(world)]
    flag_ptrs = torch.tensor(addresses, dtype=torch.int64, device=device)
    state = torch.zeros(2, dtype=torch.int64, device=device)
    torch.cuda.synchronize(device)
    return PeerBuffers(rank, world, flag_ptrs + flags, flag_ptrs, state, slot_bytes), (buffer, handle)


def _self_test(peers, dtype: torch.dtype, compile_only: bool = False) -> bool:
    """Both parities of the kernel on ``dtype`` against the reference of the known sum (rank ``r`` gives
    ``r + 1``); with ``compile_only`` the kernel is only compiled (no peer is waited for)."""
    from ..custom_ops.triton.all_reduce_rmsnorm import all_reduce_rmsnorm_launch

    device = peers.state.device
    weight = torch.linspace(0.5, 1.5, 1000, device=device, dtype=dtype)
    residual = torch.linspace(-1.0, 1.0, 3 * 1000, device=device, dtype=dtype).view(3, 1000)
    x = torch.full((3, 1000), float(peers.rank + 1), device=device, dtype=dtype)
    if compile_only:
        all_reduce_rmsnorm_launch(x, residual, weight, 1e-6, 0.0, peers, compile_only=True)
        return True
    total = torch.full_like(x, float(peers.world * (peers.world + 1) // 2))
    normed, summed = fused_add_rmsnorm_reference(total, residual, weight, 1e-6)
    for _ in range(2):  # both parities of the data slots
        got_normed, got_summed = all_reduce_rmsnorm_launch(x, residual, weight, 1e-6, 0.0, peers)
        if not torch.equal(got_summed, summed) or not torch.allclose(got_normed, normed, rtol=1e-2, atol=1e-2):
            return False
    return True


def teardown_fused_all_reduce() -> None:
    _state.clear()
