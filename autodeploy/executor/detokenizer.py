"""Incremental detokenisation and stop strings (no torch).

``IncrementalDetokenizer.push(ids)`` returns only the text that the new tokens add. It decodes a short window
of tokens twice: ``[prefix, read)`` (text already emitted) and ``[prefix, end)``; the new text is what the
second adds to the first. The window starts a few tokens before the new ones, so tokenizers whose decoded
text depends on the neighbours (SentencePiece's leading space, byte-level BPE merges) come out right, and
each step costs O(window), not O(text). When the new text ends with U+FFFD the new tokens hold an unfinished
UTF-8 sequence (an emoji or CJK character split over several byte tokens): nothing is emitted and the offsets
stay, until a later token completes it. ``flush()`` emits whatever is still held when the sequence ends.

Stop strings are matched on the cumulative text. ``StopChecker.check`` looks only at the part a new match
could end in; of several matches it takes the one that *ends* first (the one a character-by-character stream
would meet first), and of those the longest, so the result does not depend on how the text was split into
tokens. ``StopChecker.holdback`` says how many trailing characters a stream must not show yet because they
could be the start of a stop string that would be cut off (zero with ``include_stop_str_in_output``, where
the text up to the stop is shown either way).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's generated tokens into text, a step at a time.

    ``prompt_token_ids``: the last ``context_tokens`` of them give the first generated tokens their left
    context (so a SentencePiece word keeps its leading space); they are never part of the output text.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        context_tokens: int = 5,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-context_tokens:]) if context_tokens > 0 else []
        self._prefix = 0  # window start: tokens before it are dropped from _ids
        self._read = len(self._ids)  # tokens before it are in self.text
        self.text = ""  # everything emitted so far
        self.token_ids: list[int] = []  # every generated token pushed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token_ids: Iterable[int]) -> str:
        """Add generated tokens; return the text they complete (possibly empty)."""
        new = list(token_ids)
        self.token_ids.extend(new)
        self._ids.extend(new)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished UTF-8 sequence at the end); call when the sequence ends."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) and not final:
            return ""  # e.g. a skipped special token, or a byte token that decodes to nothing yet
        if after.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        del self._ids[: self._prefix]
        self._read -= self._prefix
        self._prefix = 0
        self.text += delta
        return delta


def find_stop_string(
    text: str, stop: Sequence[str], include_stop_str_in_output: bool = False, start: int = 0
) -> tuple[str, str] | None:
    """The first stop string in ``text`` (ending after ``start``): ``(text cut at it, the stop)``, or None.

    The match that ends first wins; of those the longest. The cut text keeps the stop string when
    ``include_stop_str_in_output``; otherwise it ends where the stop string begins.
    """
    best: tuple[int, int, str] | None = None  # (end, -length, stop)
    for s in stop:
        if not s:
            continue
        pos = text.find(s, max(0, start - len(s) + 1))
        if pos < 0:
            continue
        key = (pos + len(s), -len(s), s)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None:
        return None
    end, neg_len, s = best
    return (text[:end] if include_stop_str_in_output else text[: end + neg_len]), s


class StopChecker:
    """Stop strings of one sequence, checked on its growing text (each check looks only at the new part)."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._checked = 0  # length of text already searched
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._prefixes = {s[:i] for s in self.stop for i in range(1, len(s))}

    def check(self, text: str) -> tuple[str, str] | None:
        """``(text cut at the first stop string, the stop)`` or None; ``text`` is cumulative, only grows."""
        if not self.stop:
            return None
        hit = find_stop_string(text, self.stop, self.include_stop_str_in_output, start=self._checked)
        self._checked = len(text)
        return hit

    def holdback(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a stop string (and may yet be cut off)."""
        if self.include_stop_str_in_output or not self._prefixes:
            return 0
        for k in range(min(self._max_len - 1, len(text)), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0

    def streamable(self, text: str) -> str:
        """The part of ``text`` (already checked, no stop in it) that a stream can show now."""
        return text[: len(text) - self.holdback(text)]
