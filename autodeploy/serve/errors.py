"""Errors as the OpenAI API returns them: a status code and ``{"error": {"message", "type", "param", "code"}}``.

Routes raise ``APIError``; the handlers installed by ``install_error_handlers`` turn it, FastAPI's validation
errors (malformed JSON, wrong types, unknown fields), unknown URLs, typed engine errors and anything unexpected
into that body, so every 4xx tells the client what to fix and a 500 never takes the server down.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..errors import AutoDeployError, KVCacheExhaustedError, PromptTooLongError, RequestError
from ..executor.sampling_params import SamplingParams

logger = logging.getLogger("autodeploy.serve")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 503: "service_unavailable", 500: "server_error"}


class APIError(Exception):
    """An error response: HTTP ``status``, a message saying what to fix, the offending ``param`` and a ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    """The client went away before its response was ready (answered 499, which nobody reads)."""


def user_message(e: AutoDeployError) -> str:
    """The error on one line, without the engine's internal request id (the client never saw it)."""
    what = re.sub(r"^request '[^']*': ", "", e.what)
    return f"{what}; {e.hint}" if e.hint else what


_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def from_engine_error(e: AutoDeployError, prompt_param: str, aliases: dict[str, str] | None = None) -> APIError:
    """The API error for a typed engine error raised while admitting a request or building its sampling params.

    ``SamplingParams`` errors start with the field name (``temperature must be >= 0``): that becomes ``param``,
    renamed through ``aliases`` where the API calls the field something else (``logprobs`` -> ``top_logprobs``).
    """
    if isinstance(e, PromptTooLongError):
        return APIError(400, user_message(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, KVCacheExhaustedError):
        return APIError(400, user_message(e), param=prompt_param, code="kv_cache_exhausted")
    if isinstance(e, RequestError):
        field = e.what.split(" ", 1)[0]
        if field in _SAMPLING_FIELDS:
            return APIError(400, user_message(e), param=(aliases or {}).get(field, field))
        return APIError(400, user_message(e), param=prompt_param if "prompt" in e.what else None)
    return APIError(500, user_message(e))


def _is_type_tag(part: object) -> bool:
    """pydantic names the union member it tried in ``loc`` (``prompt.list[int]``); the client never wrote that."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict"})


def _validation_error(e: RequestValidationError) -> APIError:
    errors = list(e.errors())
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_type_tag(part)]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return APIError(400, f"The request body is not valid JSON ({detail}); send a JSON object "
                             "with Content-Type: application/json", code="invalid_json")
    param = loc[0] if loc else None
    where = ".".join(loc)
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {where}; remove it (see the OpenAI API reference)"
    elif kind == "missing":
        message = f"Missing required parameter: '{where}'"
    elif not loc:
        message = f"The request body must be a JSON object: {first.get('msg')}"
    else:
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        message = f"Invalid value for '{where}': {first.get('msg')} (got {got})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code="missing_required_parameter" if kind == "missing" else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif e.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return APIError(e.status_code, message).response()

    @app.exception_handler(AutoDeployError)
    async def _engine(request: Request, e: AutoDeployError) -> JSONResponse:
        return from_engine_error(e, prompt_param="prompt").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("request %s %s failed", request.method, request.url.path)
        return APIError(500, f"The server failed on this request ({type(e).__name__}: {e}); "
                             "other requests are unaffected, retry or report it").response()
