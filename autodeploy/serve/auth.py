"""API-key check: with a key set, every ``/v1/*`` request needs ``Authorization: Bearer KEY`` (else 401).

An ASGI middleware rather than a route dependency, so the key is checked before the body is read: a client
without the key learns that first, whatever its body holds. ``/health`` and ``/metrics`` stay open (probes
and scrapers), as in vLLM.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError


class APIKeyCheck:
    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1"):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        if given is not None and hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        if given is None:
            message = "Missing API key: send the header 'Authorization: Bearer <key>' (the key given to --api-key)"
        else:
            message = "Incorrect API key provided; send 'Authorization: Bearer <key>' with the key given to --api-key"
        await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
