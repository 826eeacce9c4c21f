"""Running the app with uvicorn, with a graceful shutdown.

On SIGTERM/SIGINT: the app is marked draining at once (new requests on open connections get 503, ``/health``
says 503), uvicorn stops accepting connections and waits up to ``shutdown_timeout`` seconds for in-flight
requests (streams included) to finish, cancels what is left (their engine requests are aborted), and only then
is the engine shut down.

``BackgroundServer`` runs the same server in a daemon thread on a free port (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from ..errors import AutoDeployError
from .app import create_app
from .state import ServerState

logger = logging.getLogger("autodeploy.serve")


class Server(uvicorn.Server):
    """uvicorn's server: a shutdown signal first marks the app as draining; ``on_drained`` runs after the drain.

    (Code after ``run()`` may never run: uvicorn re-raises the caught signal when it is done, so the process
    ends the way the signal says.)
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, on_drained: Callable[[], None] | None = None):
        super().__init__(config)
        self.app_state = state
        self.on_drained = on_drained

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.on_drained is not None:
            await asyncio.to_thread(self.on_drained)


def make_server(app: FastAPI, host: str, port: int, shutdown_timeout: float, log_level: str = "info",
                on_drained: Callable[[], None] | None = None) -> Server:
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=max(1, round(shutdown_timeout)),
        lifespan="off",
    )
    return Server(config, app.state.server, on_drained)


def serve(
    engine: Any,
    model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    shutdown_timeout: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve ``engine`` until SIGTERM/SIGINT, then drain and shut the engine down."""

    def stop_engine() -> None:
        engine.shutdown(timeout=shutdown_timeout)
        logger.info("in-flight requests drained; engine shut down")

    app = create_app(engine, model_name, api_key)
    make_server(app, host, port, shutdown_timeout, log_level, on_drained=stop_engine).run()


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` — uvicorn in a daemon thread on a free port of 127.0.0.1."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 10.0):
        self.server = make_server(app, host, port, shutdown_timeout, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="autodeploy-serve", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                config = self.server.config
                raise AutoDeployError(f"the server did not start on {config.host}:{config.port}",
                                      hint="see the log above; is the port taken?")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down as on SIGTERM (drain, then stop) and wait for the thread."""
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
