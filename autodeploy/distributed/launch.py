"""Starting worker ranks next to the calling process: ``spawn_workers`` and the ``WorkerGroup`` it returns.

The calling process is rank 0; ranks ``1..N-1`` are fresh ``spawn`` processes running ``target(ctx, payload)``
where ``ctx`` is a ``WorkerContext`` (rank, world size, where to meet, the channel end to read steps from).
They meet rank 0 in a file store (no ports to pick), and tell it they are alive before anyone blocks in the
rendezvous, so a worker that dies while starting is reported instead of waited for.

A worker that raises reports a ``RankFailure`` on a queue and exits with code 1; ``WorkerGroup.failure``
turns that (or a worker found dead) into a ``WorkerError`` for rank 0. ``shutdown`` joins the workers and
terminates any that do not finish.

Every process inherits rank 0's environment at spawn time (set NCCL variables before calling this).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import DistributedError, WorkerError
from .channel import ShmChannel, ShmReader
from .worker import RankFailure

logger = logging.getLogger("autodeploy.distributed")

ALIVE, FAILED = "alive", "failed"


@dataclass
class WorkerContext:
    """What a spawned worker needs to join the group and receive steps."""

    rank: int
    world_size: int
    init_method: str
    channel: ShmReader
    reports: Any  # multiprocessing queue back to rank 0

    def report_failure(self, error: BaseException) -> None:
        try:
            self.reports.put((FAILED, RankFailure.from_exception(self.rank, error)))
        except Exception:  # the queue itself broke: the exit code still tells rank 0
            logger.exception("rank %d could not report its failure", self.rank)


class PeerFailed(Exception):
    """Raised on a worker when another rank failed first: it exits quietly (rank 0 already knows)."""


def _entry(target: Callable[[WorkerContext, Any], None], ctx: WorkerContext, payload: Any) -> None:
    ctx.reports.put((ALIVE, ctx.rank))
    parent = mp.parent_process()
    if parent is not None:
        ctx.channel.parent_alive = parent.is_alive
    try:
        target(ctx, payload)
    except PeerFailed:
        _flush_and_exit(ctx, 0)
    except BaseException as e:  # noqa: BLE001 -- every failure must reach rank 0
        ctx.report_failure(e)
        logger.error("rank %d failed: %s: %s", ctx.rank, type(e).__name__, e)
        _flush_and_exit(ctx, 1)


def _flush_and_exit(ctx: WorkerContext, code: int) -> None:
    """Exit without running teardown that may block on broken peers, after the reports reached the pipe."""
    ctx.reports.close()
    ctx.reports.join_thread()
    os._exit(code)


class WorkerGroup:
    """Ranks ``1..N-1``, spawned by this process (rank 0)."""

    def __init__(self, world_size: int, target: Callable[[WorkerContext, Any], None], payload: Any, spin_s: float):
        self.world_size = world_size
        context = mp.get_context("spawn")
        fd, self.store_path = tempfile.mkstemp(prefix="autodeploy-tp-store-")
        os.close(fd)
        os.unlink(self.store_path)  # the file store creates it
        self.init_method = f"file://{self.store_path}"
        self.reports = context.Queue()
        self.channel = ShmChannel(world_size - 1, context)
        self.channel.alive = lambda: not self.dead()
        self._failures: dict[int, RankFailure] = {}
        self._alive: set[int] = set()
        self.processes = []
        for rank in range(1, world_size):
            ctx = WorkerContext(rank, world_size, self.init_method, self.channel.reader(rank - 1, spin_s), self.reports)
            process = context.Process(
                target=_entry, args=(target, ctx, payload), name=f"autodeploy-tp-rank{rank}", daemon=False
            )
            process.start()
            self.processes.append(process)

    # ---- health -------------------------------------------------------------------------------------------
    def _drain(self, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                kind, value = self.reports.get(timeout=left) if left > 0 else self.reports.get_nowait()
            except (queue.Empty, EOFError, OSError):
                return
            if kind == ALIVE:
                self._alive.add(value)
            elif kind == FAILED:
                self._failures.setdefault(value.rank, value)
                return

    def dead(self) -> list[tuple[int, int]]:
        """``(rank, exit code)`` of the workers that have exited."""
        return [(r, p.exitcode) for r, p in enumerate(self.processes, start=1) if p.exitcode is not None]

    def failure(self, wait_s: float = 0.0) -> WorkerError | None:
        """The first worker failure known within ``wait_s`` seconds (a report, or a worker found dead)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = self.dead()
            if dead or self._failures:
                self._drain(timeout=min(1.0, wait_s) if dead and not self._failures else 0.0)
            if self._failures:
                return self._failures[min(self._failures)].to_error()
            if dead:
                rank, code = dead[0]
                return WorkerError(
                    f"tensor-parallel rank {rank} exited with code {code} without reporting an error",
                    rank=rank,
                    error_type="ProcessExit",
                    hint="see that rank's output above; it may have run out of memory or been killed",
                )
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def wait_alive(self, timeout_s: float = 300.0) -> None:
        """Block until every worker has started, or raise the first failure."""
        deadline = time.monotonic() + timeout_s
        while len(self._alive) < self.world_size - 1:
            self._drain(timeout=0.1)
            error = self.failure()
            if error is not None:
                raise error
            if time.monotonic() > deadline:
                raise DistributedError(f"tensor-parallel workers did not start within {timeout_s:.0f}s")

    # ---- shutdown -----------------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                logger.warning("terminating %s, which did not stop in time", process.name)
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self.channel.close()
        self.reports.close()
        self.reports.join_thread()
        try:
            os.unlink(self.store_path)
        except FileNotFoundError:
            pass


def spawn_workers(
    world_size: int, target: Callable[[WorkerContext, Any], None], payload: Any, *, spin_s: float = 0.0
) -> WorkerGroup:
    """Start ranks ``1..world_size-1`` running ``target(ctx, payload)``; the caller is rank 0.

    ``target`` must be importable (it is pickled by name); ``payload`` is pickled once per worker.
    ``spin_s``: how long an idle worker polls for the next step before it sleeps (use 0 on CPU-only hosts).
    """
    if world_size < 2:
        raise DistributedError(f"spawn_workers needs a world of at least 2 ranks, got {world_size}")
    return WorkerGroup(world_size, target, payload, spin_s)
