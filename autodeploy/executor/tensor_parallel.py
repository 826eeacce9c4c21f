"""Tensor-parallel engines: N ranks, one scheduler. ``optimize(model, tensor_parallel_size=N)`` comes here.

Every rank builds its own shard of the graph (the same pipeline; the sharding stage reads ``ctx.rank``) and its
own runner over a KV cache of its own heads. Rank 0 — the calling process — runs the ``Engine`` (scheduler,
sampler, detokenizer) over a ``RunnerProxy`` that sends each step to the other ranks (``distributed/worker.py``);
those run only their runner, in ``serve_steps``.

Two ways in:

- **spawned** (default): the caller is rank 0 and ranks ``1..N-1`` are spawned on this host, one per GPU
  (``cuda:<rank>``), or on the CPU with gloo. Steps travel through shared memory.
- **torchrun** (``RANK``/``WORLD_SIZE`` set, any number of hosts): every process calls ``optimize`` with the same
  arguments; rank 0 gets the engine, the other ranks serve steps until rank 0 shuts down and then leave the
  program with ``SystemExit(0)`` (their script does not go on past ``optimize``). Steps travel over gloo.

Build order, the same on every rank: graph (factory, export, transforms; no collectives; a spawning rank 0
builds while its workers start) -> status exchange, so
a rank that failed (an unshardable layer, a missing file) is reported by rank 0 as its own error or as a
``WorkerError`` -> runner (KV-cache sizing agreed on the smallest rank, warm-up, CUDA-graph capture: these run
collectives, so a failure here ends the failing rank and the others find it dead).

Random weights (``random_weights`` or a bare ``config.json``) are drawn from ``config.seed`` on every rank, so all
ranks start from the same full tensors and keep their own slices.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

from ..config import AutoDeployConfig
from ..distributed import DistInfo, destroy_distributed, init_distributed, launched_by_torchrun, rank_device
from ..distributed.channel import Channel, GlooChannel
from ..distributed.launch import PeerFailed, WorkerContext, spawn_workers
from ..distributed.process_group import all_gather_objects, control_group, env_dist_info, is_initialized
from ..distributed.worker import RankFailure, RunnerProxy, serve_steps
from ..errors import ConfigError
from ..models import ModelFactory
from ..transforms import SharedContext, TransformRegistry
from ..transforms.pipeline import export_and_transform
from .engine import Engine
from .engine_setup import build_runner

logger = logging.getLogger("autodeploy.executor")

#: how long an idle worker polls for the next step before it sleeps (GPU hosts; 0 on CPU)
SPIN_S = 0.05
DESTROY_TIMEOUT_S = 20.0  # rank 0's share of the group teardown at shutdown; the workers are stopped after it


def engine_max_seq_len(config: AutoDeployConfig, factory: ModelFactory) -> int:
    """The context length ``Engine`` uses (workers size their runner with the same number)."""
    return config.max_seq_len or min(factory.max_position_embeddings or 8192, 8192)


def build_rank_graph(
    model: Any, tokenizer: Any, config: AutoDeployConfig, info: DistInfo, device: torch.device
) -> tuple[GraphModule, SharedContext, ModelFactory]:
    """This rank's transformed graph (its shard) and context."""
    factory = ModelFactory(
        model,
        dtype=config.dtype,
        device=str(device),
        random_weights=config.random_weights,
        tokenizer=tokenizer if tokenizer is not None else config.tokenizer,
        trust_remote_code=config.trust_remote_code,
    )
    if factory.random_weights:
        torch.manual_seed(config.seed)  # the same full random tensors on every rank
    ctx = SharedContext(device=factory.device, dtype=factory.dtype, factory=factory, rank=info.rank,
                        world_size=info.world_size)
    gm, ctx = export_and_transform(factory, config, ctx=ctx)
    return gm, ctx, factory


def _agree(info: DistInfo, error: BaseException | None) -> None:
    """Every rank says whether it got here cleanly; on any failure rank 0 raises and the workers leave."""
    mine = None if error is None else RankFailure.from_exception(info.rank, error)
    failures = [f for f in all_gather_objects(mine) if f is not None]
    if not failures:
        return
    if info.rank == 0:
        if error is not None:
            raise error
        raise failures[0].to_error()
    raise PeerFailed() from error


def _user_transforms() -> dict[str, type]:
    """Transforms registered in this process beyond the built-in ones (shipped to spawned workers by name)."""
    from ..transforms import library  # noqa: F401

    return {
        name: cls
        for name, cls in TransformRegistry._registry.items()
        if not cls.__module__.startswith("autodeploy.transforms.")
    }


# ---- workers --------------------------------------------------------------------------------------------------
def run_worker(model: Any, config: AutoDeployConfig, info: DistInfo, device: torch.device, channel: Any) -> None:
    """A worker rank: build its shard and runner, then serve steps until rank 0 says stop."""
    error = None
    try:
        gm, ctx, factory = build_rank_graph(model, None, config, info, device)
    except Exception as e:  # reported through the status exchange
        error = e
    _agree(info, error)
    runner, _ = build_runner(gm, ctx, config, engine_max_seq_len(config, factory))
    logger.info("rank %d ready", info.rank)
    serve_steps(runner, channel)
    runner.release_cuda_graphs()  # before the process groups are left (as rank 0 does in RunnerProxy.close)


def _spawned_worker(ctx: WorkerContext, payload: tuple[Any, AutoDeployConfig, dict[str, type]]) -> None:
    model, config, user_transforms = payload
    for name, cls in user_transforms.items():
        TransformRegistry._registry.setdefault(name, cls)
    info = DistInfo(ctx.rank, ctx.world_size, ctx.rank)
    device = rank_device(config.device, info.local_rank)
    if device.type == "cpu":  # ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    init_distributed(info, device, ctx.init_method, all_reduce=config.all_reduce)
    try:
        run_worker(model, config, info, device, ctx.channel)
    finally:
        destroy_distributed()


# ---- rank 0 ---------------------------------------------------------------------------------------------------
def _try_build(
    model: Any, tokenizer: Any, config: AutoDeployConfig, info: DistInfo, device: torch.device,
    progress: Callable[[str], None],
) -> tuple[tuple[GraphModule, SharedContext, ModelFactory] | None, BaseException | None]:
    """Rank 0's graph, or the error that stopped it (reported to every rank by ``_agree``)."""
    try:
        progress(f"Exporting and transforming (rank 0 of {info.world_size})")
        return build_rank_graph(model, tokenizer, config, info, device), None
    except Exception as e:
        return None, e


def _leader_engine(
    built: tuple[GraphModule, SharedContext, ModelFactory] | None, error: BaseException | None,
    config: AutoDeployConfig, info: DistInfo, channel: Channel, probe: Callable[[float], Any] | None,
    on_close: Callable[[bool], None], progress: Callable[[str], None],
) -> Engine:
    _agree(info, error)
    gm, ctx, factory = built
    progress("Allocating the KV cache" + (" and capturing CUDA graphs" if config.cuda_graphs else "") + " on every rank")
    try:
        engine = Engine(gm, ctx, config, factory)
    except Exception as e:
        remote = probe(5.0) if probe is not None else None
        raise (remote or e) from e
    proxy = RunnerProxy(engine.runner, channel, probe, on_close)
    engine.runner = proxy
    weakref.finalize(engine, proxy.close)  # also runs at interpreter exit, before multiprocessing joins the workers
    return engine


def _spawn(model: Any, tokenizer: Any, config: AutoDeployConfig, progress: Callable[[str], None]) -> Engine:
    world = config.tensor_parallel_size
    device = rank_device(config.device, 0)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ConfigError(
            f"tensor_parallel_size={world} needs {world} GPUs, {torch.cuda.device_count()} are visible",
            hint="lower tensor_parallel_size or make more GPUs visible (CUDA_VISIBLE_DEVICES)",
        )
    payload = (model, config, _user_transforms())
    group = spawn_workers(world, _spawned_worker, payload, spin_s=SPIN_S if device.type == "cuda" else 0.0)
    closed = False

    def on_close(healthy: bool) -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        if healthy:  # the workers leave their groups on STOP: leave ours at the same time (NCCL's teardown waits
            # for the peers, so joining the workers first would deadlock); bounded, as a peer may never get there
            left = destroy_distributed(timeout_s=DESTROY_TIMEOUT_S)
            group.shutdown(timeout_s=30.0 if left else 5.0)
        else:
            group.shutdown(timeout_s=5.0)
            destroy_distributed()

    info = DistInfo(0, world, 0)
    try:
        built, error = _try_build(model, tokenizer, config, info, device, progress)  # while the workers start
        group.wait_alive()
        init_distributed(info, device, group.init_method, all_reduce=config.all_reduce)
        return _leader_engine(built, error, config, info, group.channel, group.failure, on_close, progress)
    except BaseException:
        on_close(False)
        raise


def _join_torchrun(model: Any, tokenizer: Any, config: AutoDeployConfig, progress: Callable[[str], None]) -> Engine:
    info = env_dist_info() if launched_by_torchrun() else DistInfo(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if info.world_size != config.tensor_parallel_size:
        raise ConfigError(
            f"tensor_parallel_size={config.tensor_parallel_size}, but this job has {info.world_size} processes",
            hint="start as many processes as tensor_parallel_size (torchrun --nproc-per-node x --nnodes)",
        )
    device = rank_device(config.device, info.local_rank)
    init_distributed(info, device, "env://", all_reduce=config.all_reduce)
    channel = GlooChannel(control_group(), info.rank)
    if info.rank != 0:
        try:
            run_worker(model, config, info, device, channel)
        except PeerFailed:
            pass
        finally:
            destroy_distributed()
        raise SystemExit(0)

    def on_close(healthy: bool) -> None:
        destroy_distributed()

    built, error = _try_build(model, tokenizer, config, info, device, progress)
    return _leader_engine(built, error, config, info, channel, None, on_close, progress)


def optimize_tensor_parallel(
    model: Any, tokenizer: Any, config: AutoDeployConfig, progress: Callable[[str], None] | None = None
) -> Engine:
    """Rank 0's engine over ``config.tensor_parallel_size`` ranks (spawned here, or joined under torchrun)."""
    say = progress or (lambda message: None)
    if launched_by_torchrun() or is_initialized():
        return _join_torchrun(model, tokenizer, config, say)
    return _spawn(model, tokenizer, config, say)
