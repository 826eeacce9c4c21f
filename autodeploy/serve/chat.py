"""``POST /v1/chat/completions``: messages through the tokenizer's chat template, ``n``, ``logprobs``, SSE.

The rendered template is tokenized without adding special tokens (the template writes its own BOS where the
model wants one). Message content may be a string or a list of text parts; other parts (images, audio) get a
400. ``developer`` messages are passed to the template as ``system``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import AutoDeployError
from ..executor.outputs import CompletionOutput, RequestOutput
from .errors import APIError, user_message
from .generation import EngineStreams
from .logprobs import chat_logprobs, num_shown
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaMessage,
)
from .sampling import chat_params
from .state import ServerState, server_state, usage
from .streaming import DONE, EventStreamResponse, error_event, event, until_disconnect

router = APIRouter()


def _template_message(i: int, message: ChatMessage) -> dict[str, Any]:
    data = message.model_dump(exclude_none=True)
    if message.role == "developer":
        data["role"] = "system"
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"messages[{i}].content: part type {part.type!r} is not supported; this model "
                                    "takes text only (parts of type 'text')", param="messages")
            texts.append(part.text)
        content = "\n".join(texts)
    data["content"] = content or ""
    return data


def _prompt_ids(server: ServerState, body: ChatCompletionRequest) -> list[int]:
    if not body.messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    messages = [_template_message(i, m) for i, m in enumerate(body.messages)]
    try:
        text = server.engine.apply_chat_template(messages, add_generation_prompt=bool(body.add_generation_prompt))
    except AutoDeployError as e:
        raise APIError(400, user_message(e), param="messages") from None
    except Exception as e:  # noqa: BLE001 - a template's own checks (e.g. roles must alternate) raise anything
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    return server.engine.tokenizer.encode(text, add_special_tokens=False)


def _logprobs(server: ServerState, body: ChatCompletionRequest, c: CompletionOutput, start: int):
    if not body.logprobs or c.logprobs is None:
        return None
    end = num_shown(c)
    content = chat_logprobs(server.texts, c.token_ids[start:end], c.logprobs[start:end], body.top_logprobs or 0)
    return ChoiceLogprobs(content=content)


def _response(server: ServerState, body: ChatCompletionRequest, streams: EngineStreams,
              output: RequestOutput) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=_logprobs(server, body, c, 0),
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        for c in output.outputs
    ]
    return ChatCompletionResponse(id=streams.request_id, model=server.model_name, choices=choices,
                                  usage=usage([output]))


async def _events(server: ServerState, body: ChatCompletionRequest, streams: EngineStreams) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice]) -> str:
        return event(ChatCompletionChunk(id=streams.request_id, model=server.model_name, choices=choices))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    sent_tokens: dict[int, int] = {}
    last: RequestOutput | None = None
    try:
        for j in range(body.n or 1):
            yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
        async for _, output in streams.outputs():
            last = output
            for c in output.outputs:
                logprobs = _logprobs(server, body, c, sent_tokens.get(c.index, 0))
                if not c.delta_text and not c.finished and not (logprobs and logprobs.content):
                    continue
                sent_tokens[c.index] = len(c.token_ids)
                yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(content=c.delta_text),
                                             logprobs=logprobs, finish_reason=c.finish_reason,
                                             stop_reason=c.stop_reason)])
        if include_usage and last is not None:
            yield event(ChatCompletionChunk(id=streams.request_id, model=server.model_name, choices=[],
                                            usage=usage([last])))
    except Exception as e:  # noqa: BLE001 - the headers are out: report in the stream
        yield error_event(e)
    yield DONE


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    server = server_state(request)
    server.check_request(body.model)
    params = chat_params(body)
    streams = server.streams([_prompt_ids(server, body)], params, "chatcmpl", "messages")
    if body.stream:
        await until_disconnect(request, streams.start())
        return EventStreamResponse(_events(server, body, streams), on_close=streams.cancel)
    (output,) = await until_disconnect(request, streams.final_outputs())
    return JSONResponse(_response(server, body, streams, output).model_dump())
