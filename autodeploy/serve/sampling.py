"""What a request asks of the engine: its ``SamplingParams``, or a 400 naming the field to fix.

Value rules live in ``SamplingParams`` (its errors start with the field name, which becomes the error's
``param``); here only the API's own rules: limits that protect the server (``n``, logprob counts), field
combinations (``top_logprobs`` needs ``logprobs``) and features this server does not have.
"""

from __future__ import annotations

from typing import Any

from ..errors import AutoDeployError
from ..executor.sampling_params import SamplingParams
from .errors import APIError, from_engine_error
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_N = 128
MAX_LOGPROBS = 20


def _unsupported(param: str, what: str, fix: str) -> APIError:
    return APIError(400, f"{what} is not supported by this server; {fix}", param=param, code="unsupported_parameter")


def _common(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    if body.n is not None and body.n > MAX_N:
        raise APIError(400, f"n must be at most {MAX_N}, got {body.n}", param="n")
    if body.logit_bias:
        raise _unsupported("logit_bias", "logit_bias", "remove it")
    values = {
        "n": body.n,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": body.stop,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens,
        "stop_token_ids": body.stop_token_ids,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens,
        "logprobs": logprobs,
    }
    kwargs = {k: v for k, v in values.items() if v is not None}
    kwargs["max_tokens"] = max_tokens  # None = up to the context
    return kwargs


def _build(kwargs: dict[str, Any], aliases: dict[str, str]) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except AutoDeployError as e:
        raise from_engine_error(e, prompt_param="prompt", aliases=aliases) from None


def completion_params(body: CompletionRequest) -> SamplingParams:
    if body.suffix:
        raise _unsupported("suffix", "suffix (insertion)", "remove it")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise _unsupported("best_of", "best_of other than n", "use n to get several completions")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}", param="logprobs")
    if body.echo and body.logprobs is not None:
        raise _unsupported("echo", "echo together with logprobs (prompt logprobs)", "drop echo or logprobs")
    return _build(_common(body, body.max_tokens, body.logprobs), aliases={})


def chat_params(body: ChatCompletionRequest) -> SamplingParams:
    if body.tools or body.functions:
        raise _unsupported("tools", "tool calling", "remove tools/functions")
    fmt = (body.response_format or {}).get("type", "text")
    if fmt != "text":
        raise _unsupported("response_format", f"response_format {fmt!r}", "use {'type': 'text'} or leave it out")
    if body.modalities and set(body.modalities) != {"text"}:
        raise _unsupported("modalities", f"modalities {body.modalities}", "ask for ['text']")
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {top}", param="top_logprobs")
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true; set logprobs to true", param="top_logprobs")
    logprobs = (top or 0) if body.logprobs else None
    use_completion_tokens = body.max_completion_tokens is not None
    max_tokens = body.max_completion_tokens if use_completion_tokens else body.max_tokens
    aliases = {"logprobs": "top_logprobs"}
    if use_completion_tokens:
        aliases["max_tokens"] = "max_completion_tokens"
    return _build(_common(body, max_tokens, logprobs), aliases)
