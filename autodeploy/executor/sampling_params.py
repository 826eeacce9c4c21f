"""How to sample one request's tokens: the public ``SamplingParams`` (field names and meanings follow vLLM).

Every value is checked when the object is built; an invalid one raises ``RequestError`` (a ``ValueError``)
whose message starts with the field name, e.g. ``temperature must be >= 0, got -1``. ``stop`` is normalised
to a list of strings and ``stop_token_ids`` to a list of ints.

No torch here: the scheduler reads ``max_tokens``/``min_tokens``/stop ids/``ignore_eos``; the sampler reads
the rest on the device side.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from ..errors import RequestError

#: temperatures below this are treated as greedy (dividing logits by ~0 is not a distribution)
GREEDY_TEMPERATURE = 1e-5


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise RequestError(f"{name} must be an integer, got {value!r}") from None


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(operator.index(value))  # type: ignore[arg-type]
        except TypeError:
            raise RequestError(f"{name} must be a number, got {value!r}") from None
    result = float(value)
    if not math.isfinite(result):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    return result


def _as_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass
class SamplingParams:
    """Sampling and stopping settings of one request.

    ``temperature=0`` is greedy; ``top_k`` 0 or -1 is off; ``max_tokens=None`` generates until the context
    (or the KV cache, for a request alone) is full; ``logprobs=k`` returns the sampled token's logprob plus
    the top ``k`` (0 = only the sampled token's). Stop strings are matched by the engine on the detokenised
    text; stop token ids, EOS, ``max_tokens`` and ``min_tokens`` by the scheduler.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.n = _as_int("n", self.n)
        if self.n < 1:
            raise RequestError(f"n must be >= 1, got {self.n}")
        self.temperature = _as_float("temperature", self.temperature)
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature:g}")
        self.top_p = _as_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p:g}")
        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k}")
        self.min_p = _as_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p:g}")
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty:g}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {value:g}")
            setattr(self, name, value)
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
            if not -(2**63) <= self.seed < 2**63:  # torch generators take 64 bits; a bigger seed fails the step
                raise RequestError(f"seed must be a 64-bit integer in [-2**63, 2**63), got {self.seed}")
        if self.max_tokens is not None:
            self.max_tokens = _as_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise RequestError(f"max_tokens must be >= 1 (or None for no limit), got {self.max_tokens}")
        self.min_tokens = _as_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise RequestError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(
                f"min_tokens must be <= max_tokens, got {self.min_tokens} > max_tokens={self.max_tokens}"
            )
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _as_bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            self.logprobs = _as_int("logprobs", self.logprobs)
            if self.logprobs < 0:
                raise RequestError(f"logprobs must be >= 0 (or None), got {self.logprobs}")
        self.include_stop_str_in_output = _as_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )
        self.skip_special_tokens = _as_bool("skip_special_tokens", self.skip_special_tokens)

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)):
            raise RequestError(f"stop must be a string, a list of strings or None, got {stop!r}")
        result: list[str] = []
        for item in items:
            if not isinstance(item, str) or not item:
                raise RequestError(f"stop must hold non-empty strings, got {item!r}")
            result.append(item)
        return result

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple, set, frozenset)):
            raise RequestError(f"stop_token_ids must be a list of token ids or None, got {ids!r}")
        result = [_as_int("stop_token_ids", i) for i in ids]
        for i in result:
            if i < 0:
                raise RequestError(f"stop_token_ids must hold token ids >= 0, got {i}")
        return result

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (``temperature`` is 0, or below ``GREEDY_TEMPERATURE``)."""
        return self.temperature < GREEDY_TEMPERATURE
