"""Engine logprobs (one ``{token_id: Logprob}`` per generated token) in the two OpenAI formats.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``. Completions (legacy): parallel
lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (token -> logprob dicts) and ``text_offset``.
A token's text is the tokenizer's decoding of that one id, cached per server. The EOS / stop token that ended
a completion is not in its text, so it gets no logprobs entry either (usage still counts it).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..executor.outputs import CompletionOutput, Logprob
from .protocol import CompletionLogprobs, TokenLogprob, TopLogprob


class TokenTexts:
    """Token id -> its text (special tokens included), decoded once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=1 << 18)(self._decode)

    def _decode(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def num_shown(c: CompletionOutput) -> int:
    """How many of a completion's tokens get logprobs: all but a final EOS / stop token (it is not in the text)."""
    ended_by_token = c.finish_reason == "stop" and not isinstance(c.stop_reason, str) and c.token_ids
    return len(c.token_ids) - 1 if ended_by_token else len(c.token_ids)


def _ranked(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    """The top alternatives of one position, most likely first (the sampled token only if it ranked)."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None), key=lambda item: item[1].rank)


def chat_logprobs(
    texts: TokenTexts, token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int
) -> list[TokenLogprob]:
    result = []
    for token_id, entry in zip(token_ids, entries):
        token = texts.text(token_id)
        top = [
            TopLogprob(token=(t := texts.text(tid)), logprob=lp.logprob, bytes=list(t.encode()))
            for tid, lp in _ranked(entry)[:top_n]
        ]
        result.append(
            TokenLogprob(token=token, logprob=entry[token_id].logprob, bytes=list(token.encode()), top_logprobs=top)
        )
    return result


def completion_logprobs(
    texts: TokenTexts, token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int, offset: int
) -> CompletionLogprobs:
    """Legacy logprobs; ``offset`` is where the first token's text starts in the choice's text."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        token = texts.text(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(entry[token_id].logprob)
        top = {texts.text(tid): lp.logprob for tid, lp in _ranked(entry)[:top_n]}
        top.setdefault(token, entry[token_id].logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out
