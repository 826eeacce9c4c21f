"""The engine's view of one user request: its ``n`` sequences, their text, logprobs and where outputs go.

Outputs are published after each step that changed the request: to a ``sink`` callable (streaming: async
queues of ``generate_async`` and the server) and always kept as the latest cumulative ``RequestOutput``.
Stop strings are found here on the detokenised text; the engine then finishes the sequence.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from .detokenizer import IncrementalDetokenizer, StopChecker
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .request import Request
from .sampling_params import SamplingParams


class _Sequence:
    """One of the ``n`` completions: its request, detokeniser, text and logprobs."""

    def __init__(self, index: int, request: Request, tokenizer: Any):
        self.request = request
        self.completion = CompletionOutput(index=index)
        params = request.sampling_params
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
            if tokenizer is not None
            else None
        )
        self.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
        self.full_text = ""  # everything decoded so far, stop strings not yet cut
        self.published_text = 0
        self.published_tokens = 0
        self.generator: torch.Generator | None = None
        if params.logprobs is not None:
            self.completion.logprobs = []
            self.completion.cumulative_logprob = 0.0


class RequestState:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        sink: Callable[[Any], None] | None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.sink = sink
        self.sequences: dict[str, _Sequence] = {}
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.error: BaseException | None = None
        self.latest: RequestOutput | None = None
        self._num_unfinished = 0  # sequences without a finish reason yet

    # ---- sequences ----------------------------------------------------------------------------------------
    def make_children(self, eos_token_ids: frozenset[int], priority: int) -> list[Request]:
        n = self.params.n
        children = []
        for i in range(n):
            params = self.params
            if n > 1:  # each sequence samples on its own; a seeded request stays reproducible per sequence
                seed = None if params.seed is None else params.seed + i
                params = dataclasses.replace(params, n=1, seed=seed)
            child_id = self.request_id if n == 1 else f"{self.request_id}#{i}"
            request = Request(child_id, self.prompt_token_ids, params, eos_token_ids, priority=priority)
            self.sequences[child_id] = _Sequence(i, request, self.tokenizer)
            children.append(request)
        self._num_unfinished = len(self.sequences)
        return children

    @property
    def children(self) -> list[Request]:
        return [s.request for s in self.sequences.values()]

    def child(self, request_id: str) -> Request:
        return self.sequences[request_id].request

    def generator_for(self, request: Request, device: torch.device) -> torch.Generator | None:
        """The sequence's own generator when it has a seed (created once, stepped by the sampler)."""
        seq = self.sequences[request.request_id]
        seed = request.sampling_params.seed
        if seed is None:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator(device=device)
            seq.generator.manual_seed(seed)
        return seq.generator

    # ---- progress -----------------------------------------------------------------------------------------
    def on_tokens(self, request_id: str, tokens: list[int], extra: Any, now: float) -> str | None:
        """Record a sequence's sampled tokens (already appended to its request by the scheduler); return a hit
        stop string."""
        seq = self.sequences[request_id]
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
            self.metrics.num_cached_tokens = seq.request.num_cached_tokens
        if extra is not None and seq.completion.logprobs is not None:
            sampled_logprob, top = extra
            entry = {tokens[-1]: Logprob(sampled_logprob)}
            for rank, (token_id, logprob) in enumerate(top, start=1):
                entry.setdefault(token_id, Logprob(logprob, rank=rank))
            entry[tokens[-1]].rank = next((r for r, (t, _) in enumerate(top, 1) if t == tokens[-1]), None)
            seq.completion.logprobs.append(entry)
            seq.completion.cumulative_logprob += sampled_logprob
        if seq.detokenizer is None:
            return None
        seq.full_text += seq.detokenizer.push(tokens)
        return self._check_stop(seq)

    @staticmethod
    def _check_stop(seq: _Sequence) -> str | None:
        hit = seq.stop_checker.check(seq.full_text) if seq.stop_checker is not None else None
        if hit is not None:
            seq.completion.text, stop = hit
            return stop
        seq.completion.text = seq.full_text
        return None

    def on_finished(self, request: Request) -> None:
        seq = self.sequences[request.request_id]
        completion = seq.completion
        if completion.finish_reason is None and seq.detokenizer is not None and not isinstance(request.stop_reason, str):
            seq.full_text += seq.detokenizer.flush()  # a trailing partial character, now final
            self._check_stop(seq)
        if completion.finish_reason is None:
            completion.finish_reason = request.finish_reason
            completion.stop_reason = request.stop_reason
            completion.token_ids = list(request.output_token_ids)
            if completion.finish_reason is not None:
                self._num_unfinished -= 1
        self.metrics.num_preemptions += request.num_preemptions

    @property
    def finished(self) -> bool:
        """Failed, or every sequence has its finish reason."""
        return self.error is not None or self._num_unfinished == 0

    # ---- outputs ------------------------------------------------------------------------------------------
    def _streamable_text(self, seq: _Sequence) -> str:
        """Text safe to show: while a stop string could still be forming at the end, hold that tail back."""
        text = seq.completion.text
        if seq.completion.finish_reason is not None or seq.stop_checker is None:
            return text
        return text[: max(seq.published_text, len(seq.stop_checker.streamable(text)))]

    def publish(self, now: float) -> RequestOutput:
        completions = []
        for seq in self.sequences.values():
            seq.completion.token_ids = seq.request.known_output_token_ids
            text = self._streamable_text(seq)
            delta_text = text[seq.published_text :]
            delta_tokens = seq.completion.token_ids[seq.published_tokens :]
            seq.published_text, seq.published_tokens = len(text), len(seq.completion.token_ids)
            completions.append(
                dataclasses.replace(
                    seq.completion,
                    text=text,
                    token_ids=list(seq.completion.token_ids),
                    logprobs=None if seq.completion.logprobs is None else list(seq.completion.logprobs),
                    delta_text=delta_text,
                    delta_token_ids=delta_tokens,
                )
            )
        finished = self.finished
        if finished and self.metrics.finished_time is None:
            self.metrics.finished_time = now
        self.latest = RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, completions, finished, dataclasses.replace(self.metrics)
        )
        if self.sink is not None:
            self.sink(self.latest)
        return self.latest

    def fail(self, error: BaseException) -> None:
        self.error = error
        if self.sink is not None:
            self.sink(error)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def final_output(self) -> RequestOutput:
        if self.latest is None:
            return self.publish(time.monotonic())
        return self.latest
