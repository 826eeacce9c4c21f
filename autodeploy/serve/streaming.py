"""Server-sent events and client disconnects.

A stream is ``data: {json}\\n\\n`` events ending with ``data: [DONE]\\n\\n``. An error after the headers went out
is sent as one ``data: {"error": {...}}`` event, then ``[DONE]``.

Disconnects must reach the engine, or a gone client keeps its KV blocks until its ``max_tokens``:
- streaming: Starlette (ASGI HTTP spec < 2.4, as uvicorn speaks) listens for ``http.disconnect`` and cancels the
  body iterator; ``EventStreamResponse`` also calls ``on_close`` whatever ends the response, so the engine
  requests are cancelled even if the iterator was parked at a ``yield``.
- non-streaming: ``until_disconnect`` races the work against the client's ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError, ClientDisconnected

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def error_event(e: BaseException) -> str:
    error = e if isinstance(e, APIError) else APIError(500, f"generation failed ({type(e).__name__}: {e})")
    return event(error.body())


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled (and ``ClientDisconnected`` raised) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # its engine requests are aborted as the cancellation unwinds
    if task not in done:
        raise ClientDisconnected()
    return task.result()
