"""``create_app(engine, model_name, api_key=None)``: the FastAPI app around one shared engine.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``,
``GET /metrics``. The app does not own the engine: whoever built it shuts it down (``serve/server.py`` does,
after uvicorn has drained the in-flight requests).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from . import chat, completions
from .auth import APIKeyCheck
from .errors import install_error_handlers
from .metrics import RequestCounter
from .protocol import ModelCard, ModelList
from .state import ServerState, server_state

ENDPOINTS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/version"})


def _add_info_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        server = server_state(request)
        card = ModelCard(id=server.model_name, max_model_len=server.engine.max_seq_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        server = server_state(request)
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(engine: Any, model_name: str, api_key: str | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` under ``model_name`` (``api_key``: require Bearer auth)."""
    app = FastAPI(title="autodeploy", version=__version__, summary="OpenAI-compatible server")
    server = ServerState(engine, model_name)
    app.state.server = server
    install_error_handlers(app)
    _add_info_routes(app)
    app.include_router(completions.router)
    app.include_router(chat.router)
    if api_key:
        app.add_middleware(APIKeyCheck, api_key=api_key)
    app.add_middleware(RequestCounter, metrics=server.metrics, endpoints=ENDPOINTS)  # outermost: counts the 401s
    return app
