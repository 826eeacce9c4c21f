"""``POST /v1/completions``: text or token-id prompts (one or a batch), ``n``, ``echo``, legacy ``logprobs``, SSE.

Choice ``i * n + j`` is the ``j``-th completion of prompt ``i``, as in the OpenAI API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..executor.outputs import CompletionOutput, RequestOutput
from .errors import APIError
from .generation import EngineStreams, Prompt
from .logprobs import completion_logprobs, num_shown
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse
from .sampling import completion_params
from .state import ServerState, server_state, usage
from .streaming import DONE, EventStreamResponse, error_event, event, until_disconnect

router = APIRouter()


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty: send a string, a list of strings or token ids", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _echo_text(server: ServerState, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    tokenizer = server.engine.tokenizer
    return tokenizer.decode(prompt) if tokenizer is not None else ""


def _logprobs(server: ServerState, body: CompletionRequest, c: CompletionOutput, start: int, offset: int):
    if body.logprobs is None or c.logprobs is None:
        return None
    end = num_shown(c)
    return completion_logprobs(server.texts, c.token_ids[start:end], c.logprobs[start:end], body.logprobs, offset)


def _response(server: ServerState, body: CompletionRequest, streams: EngineStreams,
              outputs: list[RequestOutput]) -> CompletionResponse:
    n = body.n or 1
    choices = []
    for i, output in enumerate(outputs):
        prefix = _echo_text(server, streams.prompts[i]) if body.echo else ""
        for c in output.outputs:
            choices.append(CompletionChoice(
                index=i * n + c.index,
                text=prefix + c.text,
                logprobs=_logprobs(server, body, c, 0, len(prefix)),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            ))
    return CompletionResponse(id=streams.request_id, model=server.model_name, choices=choices, usage=usage(outputs))


async def _events(server: ServerState, body: CompletionRequest, streams: EngineStreams) -> AsyncIterator[str]:
    n = body.n or 1
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    sent_tokens: dict[int, int] = {}  # per choice: tokens whose logprobs went out
    token_offset: dict[int, int] = {}  # per choice: text offset of its next token (legacy logprobs)
    last: dict[int, RequestOutput] = {}
    try:
        async for i, output in streams.outputs():
            last[i] = output
            for c in output.outputs:
                index = i * n + c.index
                text = c.delta_text
                if index not in token_offset:
                    prefix = _echo_text(server, streams.prompts[i]) if body.echo else ""
                    text, token_offset[index] = prefix + text, len(prefix)
                logprobs = _logprobs(server, body, c, sent_tokens.get(index, 0), token_offset[index])
                if not text and not c.finished and not (logprobs and logprobs.tokens):
                    continue
                sent_tokens[index] = len(c.token_ids)
                if logprobs and logprobs.tokens:
                    token_offset[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                                          stop_reason=c.stop_reason)
                yield event(CompletionResponse(id=streams.request_id, model=server.model_name, choices=[choice]))
        if include_usage:
            outputs = [last[i] for i in sorted(last)]
            yield event(CompletionResponse(id=streams.request_id, model=server.model_name, choices=[],
                                           usage=usage(outputs)))
    except Exception as e:  # noqa: BLE001 - the headers are out: report in the stream
        yield error_event(e)
    yield DONE


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    server = server_state(request)
    server.check_request(body.model)
    params = completion_params(body)
    streams = server.streams(_prompts(body.prompt), params, "cmpl", "prompt")
    if body.stream:
        await until_disconnect(request, streams.start())
        return EventStreamResponse(_events(server, body, streams), on_close=streams.cancel)
    outputs = await until_disconnect(request, streams.final_outputs())
    return JSONResponse(_response(server, body, streams, outputs).model_dump())
