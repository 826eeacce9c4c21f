"""OpenAI-compatible HTTP server: one shared engine behind FastAPI + uvicorn (``autodeploy serve``).

    app.py          create_app(engine, model_name, api_key=None): routes /v1/models, /health, /metrics
    completions.py  POST /v1/completions          chat.py   POST /v1/chat/completions
    protocol.py     pydantic request/response schemas (OpenAI's)
    sampling.py     request -> SamplingParams, or a 400 naming the field
    generation.py   one API call's engine requests, merged, cancellable (client disconnect -> abort)
    streaming.py    SSE events, disconnect handling        logprobs.py  the two OpenAI logprob formats
    errors.py       the OpenAI error body for every failure   auth.py   Bearer API key
    metrics.py      Prometheus metrics                        state.py  what the routes share
    server.py       uvicorn with graceful shutdown; BackgroundServer for tests
    cli.py          the ``serve`` subcommand

FastAPI and uvicorn load on first use of ``create_app``, ``serve`` or ``BackgroundServer``, so building the CLI
parser (which imports ``serve.cli``) does not need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .server import BackgroundServer, serve

_LAZY = {"create_app": "app", "serve": "server", "BackgroundServer": "server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'autodeploy.serve' has no attribute {name!r}")


__all__ = ["BackgroundServer", "create_app", "serve"]
