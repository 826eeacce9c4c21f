"""What every route shares: the one engine, the served model's name, metrics, token texts, the draining flag."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request

from ..executor.outputs import RequestOutput
from ..executor.sampling_params import SamplingParams
from .errors import APIError
from .generation import EngineStreams, Prompt
from .logprobs import TokenTexts
from .metrics import ServerMetrics
from .protocol import PromptTokensDetails, Usage


class ServerState:
    def __init__(self, engine: Any, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.metrics = ServerMetrics(engine)
        self.texts = TokenTexts(engine.tokenizer)
        self.draining = False  # set on SIGTERM: new requests get 503 while in-flight ones finish

    def check_request(self, model: str | None) -> None:
        """Raise the API error for a request that can't be served: shutting down, or another model."""
        if self.draining:
            raise APIError(503, "The server is shutting down and takes no new requests; retry on another replica")
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}' (see /v1/models)",
                param="model",
                code="model_not_found",
            )

    def streams(self, prompts: list[Prompt], params: SamplingParams, prefix: str, prompt_param: str) -> EngineStreams:
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        return EngineStreams(self.engine, self.metrics, prompts, params, request_id, prompt_param)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def usage(outputs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.metrics.num_cached_tokens for o in outputs if o.metrics is not None)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )
