"""The engine requests behind one API call: one per prompt, merged into one stream of ``(prompt index, output)``.

Each prompt runs through ``engine.generate_async`` in its own pump task, so all prompts are admitted at once
and share the engine's batch. ``start()`` waits for every prompt's first output, so admission errors (prompt
too long, bad values the scheduler checks) become a 4xx before a streaming response has sent its headers.

Cancellation frees KV blocks: ``cancel()`` (synchronous, so it is safe inside a cancelled scope, e.g. when
Starlette cancels a stream whose client disconnected) cancels the pumps; each pump's ``generate_async`` then
sees the cancellation and aborts its engine request in its ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ..errors import AutoDeployError
from ..executor.outputs import RequestOutput
from ..executor.sampling_params import SamplingParams
from .errors import APIError, from_engine_error
from .metrics import ServerMetrics

_DONE = object()

Prompt = str | list[int]


class EngineStreams:
    def __init__(
        self,
        engine: Any,
        metrics: ServerMetrics,
        prompts: list[Prompt],
        params: SamplingParams,
        request_id: str,
        prompt_param: str = "prompt",
    ):
        self.engine = engine
        self.metrics = metrics
        self.prompts = prompts
        self.params = params
        self.request_id = request_id
        self.prompt_param = prompt_param
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffer: list[tuple[int, Any]] = []

    def _engine_id(self, index: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{index}"

    async def _pump(self, index: int, prompt: Prompt) -> None:
        tracker = self.metrics.tracker()
        stream = self.engine.generate_async(prompt, self.params, request_id=self._engine_id(index))
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    tracker.observe(output)
                    self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            tracker.cancelled(self.params.n)
            raise
        except Exception as e:  # admission errors and failed engine steps: handed to the consumer
            self._queue.put_nowait((index, e))
            return
        self._queue.put_nowait((index, _DONE))

    def _error(self, index: int, e: Exception) -> Exception:
        if not isinstance(e, AutoDeployError):
            return e
        error = from_engine_error(e, self.prompt_param)
        if len(self.prompts) > 1:
            error.message = f"prompt {index}: {error.message}"
        return error

    async def start(self) -> None:
        """Admit every prompt; return once each has its first output. On an error, cancel all and raise it."""
        self._tasks = [asyncio.create_task(self._pump(i, p)) for i, p in enumerate(self.prompts)]
        started: set[int] = set()
        try:
            while len(started) < len(self.prompts):
                index, item = await self._queue.get()
                if isinstance(item, Exception):
                    raise self._error(index, item)
                started.add(index)
                self._buffer.append((index, item))
        except BaseException:
            self.cancel()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every prompt as it comes (after ``start``); raises a failed request's error."""
        done = 0
        try:
            while done < len(self.prompts):
                index, item = self._buffer.pop(0) if self._buffer else await self._queue.get()
                if item is _DONE:
                    done += 1
                elif isinstance(item, Exception):
                    raise self._error(index, item)
                else:
                    yield index, item
        finally:
            self.cancel()

    async def final_outputs(self) -> list[RequestOutput]:
        """Run to the end; the last output of each prompt, in prompt order."""
        await self.start()
        last: dict[int, RequestOutput] = {}
        async for index, output in self.outputs():
            last[index] = output
        missing = [i for i in range(len(self.prompts)) if i not in last]
        if missing:
            raise APIError(500, f"the engine returned no output for prompt(s) {missing}")
        return [last[i] for i in range(len(self.prompts))]

    def cancel(self) -> None:
        """Stop every unfinished engine request (aborted, blocks freed); a no-op once all finished."""
        for task in self._tasks:
            if not task.done():
                task.cancel()
