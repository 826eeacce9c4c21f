"""Driving every rank's model runner from rank 0: ``RunnerProxy`` (rank 0) and ``serve_steps`` (the workers).

Rank 0 runs the whole engine (scheduler, sampler, detokenizer); its runner is a ``RunnerProxy``. Each
``execute(prefills, decodes[, fill])`` first sends the step to the workers — the entries as plain tuples, and
the sampled tokens an asynchronous step reads on the device (``fill``) broadcast over the model group — then
runs the local runner. Every worker sits in ``serve_steps``: receive a step, run the same graph on the same
inputs; the collectives inside the graphs line up because every rank runs every step in the same order.

Messages (``channel.py`` carries them): ``("step", prefills, decodes, fill)``, ``("call", fn, args)`` (run
``fn(runner, *args)`` on every rank and gather the results — introspection and tests), ``("stop",)``.

This module knows the runner only through ``execute`` and the entry fields it packs (``token_ids``,
``start_pos``, ``block_ids``, ``sample``), so it composes with any runner of that shape.

Failures: a worker that raises reports a ``RankFailure`` (through ``report`` of its launcher) and exits. Rank 0
checks the workers before each step and, when a step fails, waits briefly for such a report; either way it
raises a ``WorkerError`` naming the rank, and the proxy stays broken (the ranks' collectives no longer line up).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..errors import AutoDeployError, DistributedError, WorkerError
from .channel import Channel
from .process_group import all_gather_objects

logger = logging.getLogger("autodeploy.distributed")

STEP, CALL, STOP = "step", "call", "stop"


class WireEntry(NamedTuple):
    """A step entry as the workers receive it (the fields the model runner packs)."""

    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool


@dataclasses.dataclass
class RankFailure:
    """What went wrong on one rank, in a form that crosses process boundaries."""

    rank: int
    error_type: str
    message: str
    where: str | None = None
    hint: str | None = None
    traceback: str = ""

    @classmethod
    def from_exception(cls, rank: int, error: BaseException) -> RankFailure:
        what = error.what if isinstance(error, AutoDeployError) else str(error)
        where = error.where if isinstance(error, AutoDeployError) else None
        hint = error.hint if isinstance(error, AutoDeployError) else None
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return cls(rank, type(error).__name__, what, where, hint, tb)

    def to_error(self) -> WorkerError:
        return WorkerError(
            f"tensor-parallel rank {self.rank} failed: {self.error_type}: {self.message}",
            rank=self.rank,
            error_type=self.error_type,
            remote_traceback=self.traceback,
            where=self.where,
            hint=self.hint,
        )


def _wire(entries: list[Any]) -> list[tuple]:
    return [(list(e.token_ids), int(e.start_pos), list(e.block_ids), bool(e.sample)) for e in entries]


def _unwire(entries: list[tuple]) -> list[WireEntry]:
    return [WireEntry(*e) for e in entries]


#: ``() -> WorkerError | None``: a failure of a worker, if any is known (rank 0's launcher provides it)
FailureProbe = Callable[[float], "WorkerError | None"]


class RunnerProxy:
    """Rank 0's runner: sends each step to the workers, then runs it on the local runner.

    Attribute reads other than its own fall through to the local runner (``spec``, ``cuda_graphs``, ...).
    """

    def __init__(
        self,
        runner: Any,
        channel: Channel,
        probe: FailureProbe | None = None,
        on_close: Callable[[bool], None] | None = None,
    ):
        self.runner = runner
        self.channel = channel
        self.probe = probe
        self.on_close = on_close
        self.error: DistributedError | None = None
        self.closed = False
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name == "runner":  # not set yet (during unpickling): don't recurse
            raise AttributeError(name)
        return getattr(self.runner, name)

    def _check(self) -> None:
        if self.error is None and self.probe is not None:
            self.error = self.probe(0.0)
        if self.error is None and self.closed:
            self.error = DistributedError("the tensor-parallel workers were shut down", hint="build a new engine")
        if self.error is not None:
            raise self.error

    def _broken(self, error: BaseException) -> DistributedError:
        """The group is unusable after ``error`` in a step: find out why (a worker's report, if it sends one)."""
        found = self.probe(5.0) if self.probe is not None else None
        if found is None:
            found = DistributedError(
                f"a tensor-parallel step failed on rank 0: {type(error).__name__}: {error}",
                hint="the ranks' collectives no longer line up; build a new engine",
            )
        self.error = found
        return found

    @torch.inference_mode()
    def execute(self, prefills: list[Any], decodes: list[Any], fill: Any = None) -> torch.Tensor:
        with self._lock:
            self._check()
            tokens = None
            shell = None
            if fill is not None:
                tokens = fill.tokens.contiguous()
                shell = (dataclasses.replace(fill, tokens=None), tokens.numel(), tokens.dtype)
            try:
                self.channel.send((STEP, _wire(prefills), _wire(decodes), shell))
                if tokens is not None:
                    dist.broadcast(tokens, src=0)
                    return self.runner.execute(prefills, decodes, fill)
                return self.runner.execute(prefills, decodes)
            except Exception as e:
                raise self._broken(e) from e

    def call_on_all_ranks(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``[fn(runner_of_rank_r, *args) for r in ranks]``; ``fn`` must be importable (pickled by name)."""
        with self._lock:
            self._check()
            try:
                self.channel.send((CALL, fn, args))
                return all_gather_objects(fn(self.runner, *args))
            except Exception as e:
                raise self._broken(e) from e

    def close(self) -> None:
        """Stop the workers (idempotent). Safe to call from a finalizer or ``atexit``."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            healthy = self.error is None
            if healthy:
                try:
                    self.channel.send((STOP,))
                except Exception as e:  # the workers are gone already; the launcher cleans up
                    logger.warning("could not send stop to the workers: %s", e)
                    healthy = False
            release = getattr(self.runner, "release_cuda_graphs", None)
            if healthy and release is not None:
                release()
            if self.on_close is not None:
                self.on_close(healthy)


def serve_steps(runner: Any, channel: Channel) -> None:
    """A worker's loop: run every step rank 0 sends until it says stop. Exceptions propagate (and end the rank)."""
    device = getattr(runner, "device", torch.device("cpu"))
    while True:
        message = channel.recv()
        kind = message[0]
        if kind == STOP:
            return
        if kind == STEP:
            _, prefills, decodes, shell = message
            with torch.inference_mode():
                if shell is None:
                    runner.execute(_unwire(prefills), _unwire(decodes))
                    continue
                fill, numel, dtype = shell
                tokens = torch.empty(numel, dtype=dtype, device=device)
                dist.broadcast(tokens, src=0)
                runner.execute(_unwire(prefills), _unwire(decodes), dataclasses.replace(fill, tokens=tokens))
        elif kind == CALL:
            _, fn, args = message
            all_gather_objects(fn(runner, *args))
        else:
            raise DistributedError(f"unknown message {kind!r} from rank 0")
