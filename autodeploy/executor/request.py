"""One generation request as the scheduler and block manager see it (no torch).

A request's tokens are ``prompt_token_ids + output_token_ids``. ``num_computed_tokens`` counts the leading
tokens whose K/V are in the cache (written by a step that ran, or reused from the prefix cache); the rest
must still be fed to the model. In the steady decode state ``num_computed_tokens == num_tokens - 1``: the
last sampled token is the next input. ``block_ids`` is the request's block table, owned and mutated by the
``BlockManager``: token ``i`` lives in block ``block_ids[i // block_size]`` at offset ``i % block_size``.
"""

from __future__ import annotations

import enum
import operator
import time
from dataclasses import dataclass, field

from ..errors import RequestError
from .sampling_params import SamplingParams


#: an output token sampled on the device and not yet known on the host (asynchronous scheduling)
PLACEHOLDER_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @staticmethod
    def for_finish_reason(reason: str) -> RequestStatus:
        """The finished status for an OpenAI-style finish reason: "stop", "length" or "abort"."""
        try:
            return _STATUS_OF_REASON[reason]
        except KeyError:
            raise ValueError(
                f"finish reason must be one of {sorted(_STATUS_OF_REASON)}, got {reason!r}"
            ) from None


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)
_STATUS_OF_REASON = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
}


@dataclass(eq=False)
class Request:
    """A request's identity, tokens, progress and outcome. Compared by identity, hashable.

    ``priority``: lower is served sooner (vLLM semantics); ties go to the earlier ``arrival_time``.
    ``eos_token_ids``: the model's end-of-sequence ids (an int or any iterable; stored as a frozenset).
    ``num_cached_tokens``: prompt tokens served from the prefix cache when the request was first admitted.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    #: prefix-cache keys of the full blocks of ``all_token_ids`` computed so far (tokens never change, so
    #: neither do these); filled lazily by the ``BlockManager``, kept across preemptions
    block_hashes: list[bytes] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        try:
            self.prompt_token_ids = [operator.index(t) for t in self.prompt_token_ids]
        except TypeError:
            raise RequestError(
                f"prompt_token_ids of request {self.request_id!r} must be integers",
                hint="pass token ids from the tokenizer, not text or floats",
            ) from None
        if any(t < 0 for t in self.prompt_token_ids):
            raise RequestError(f"prompt_token_ids of request {self.request_id!r} must be >= 0")
        eos = self.eos_token_ids
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)  # type: ignore[arg-type]

    # ---- tokens -------------------------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def known_output_token_ids(self) -> list[int]:
        """The output tokens already read back (without the in-flight placeholders at the end)."""
        outputs = self.output_token_ids
        end = len(outputs)
        while end and outputs[end - 1] == PLACEHOLDER_TOKEN:
            end -= 1
        return outputs if end == len(outputs) else outputs[:end]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    # ---- state --------------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_pending_tokens(self) -> int:
        """Known tokens whose K/V still have to be computed (1 in the steady decode state)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_decode_phase(self) -> bool:
        """The request has output and only its last sampled token is left to feed."""
        return bool(self.output_token_ids) and self.num_computed_tokens == self.num_tokens - 1

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.for_finish_reason(reason)
        self.finish_reason = reason
        self.stop_reason = stop_reason
