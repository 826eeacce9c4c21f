"""In-flight batching: which requests run in the next step, and how many tokens each feeds (no torch).

One engine step is ``out = scheduler.schedule()`` → the model runner computes ``out.entries`` (writing their
K/V into the cache through ``request.block_ids``) and samples one token for each entry with ``sample=True``
→ ``finished = scheduler.update(out, {request_id: [token_id]})`` → the engine detokenises, and calls
``finish_request(request_id, "stop", stop_string)`` when a stop string appears.

``schedule()`` fills a budget of ``max_num_batched_tokens`` tokens and at most ``max_num_seqs`` running
requests, in this order:

1. running requests in the decode phase, one token each;
2. running requests with a partial prefill (chunked prefill), as much of the rest as the budget allows;
3. waiting requests, in ``(priority, arrival_time)`` order, head of line: the first one that does not fit
   stops admission. A new request first reuses its longest cached full-block prefix. Without chunked
   prefill a prefill is scheduled only whole. Nothing is admitted in a step that preempted.

When a running request needs a block and none is free, the running request that comes last in
``(priority, arrival_time)`` order is preempted by recompute: its blocks are freed, ``num_computed_tokens``
drops to 0 and it goes back to the waiting queue (which is kept in the same order, so it comes before anyone
who arrived later). Later it is prefilled again over prompt + generated tokens (mostly from the prefix cache
when enabled) and continues, producing the same tokens it would have without preemption (given a sampler
whose random draws depend only on the request: its seed and the tokens sampled so far). The first request
in that order is never preempted by another, so it always makes progress.

Not thread-safe: one thread (the engine's step loop, under its lock) calls every method.

Asynchronous scheduling: ``commit(out)`` right after ``schedule()`` records the step as launched — computed
tokens advance and every sampling entry gets a ``PLACEHOLDER_TOKEN`` output — so the next ``schedule()`` can run
before this step's tokens reach the host (the runner feeds them on the device). ``update(out, ...)`` of a
committed step then fills the placeholders in and applies the stop checks; work scheduled meanwhile for a request
that turns out finished is discarded. A request that will stop by length once its placeholders are filled is not
scheduled again.

Lengths: a request stops with ``"length"`` at ``max_tokens`` or when prompt + output reach the context,
``min(max_model_len, num_blocks * block_size + 1)``: a request alone never needs more than the whole pool.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from ..errors import ConfigError, KVCacheExhaustedError, PromptTooLongError, RequestError
from .block_manager import BlockManager
from .request import PLACEHOLDER_TOKEN, Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    block_size: int = 16
    num_blocks: int = 1024
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"scheduler {name} must be a positive integer, got {value!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}): a whole prompt has to fit in one step",
                hint="enable chunked prefill, raise max_num_batched_tokens or lower max_model_len",
            )


@dataclass(slots=True)
class ScheduledEntry:
    """One request's share of a step: feed tokens ``[start_pos, start_pos + num_new_tokens)``.

    ``sample``: the chunk reaches the last known token, so its last position's logits are sampled.
    Has the fields the model runner's ``StepEntry`` has (``token_ids``, ``start_pos``, ``block_ids``,
    ``sample``).
    """

    request: Request
    num_new_tokens: int
    start_pos: int
    sample: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids_between(self.start_pos, self.start_pos + self.num_new_tokens)

    @property
    def block_ids(self) -> list[int]:
        return self.request.block_ids


@dataclass
class SchedulerOutput:
    """One step's work: prefill entries (chunks, recomputes) then decode entries (one token each)."""

    prefills: list[ScheduledEntry] = field(default_factory=list)
    decodes: list[ScheduledEntry] = field(default_factory=list)
    #: requests preempted while building this step (already back in the waiting queue)
    preempted: list[Request] = field(default_factory=list)
    #: set by ``Scheduler.commit``: the step was launched before the previous step's tokens were known
    committed: bool = False

    @property
    def entries(self) -> list[ScheduledEntry]:
        return self.prefills + self.decodes

    @property
    def num_batched_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.prefills) + len(self.decodes)

    @property
    def num_sampled(self) -> int:
        return sum(e.sample for e in self.prefills) + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    def drop_finished(self) -> None:
        """Forget the entries of requests that finished since ``schedule()`` (before anything was launched)."""
        self.prefills = [e for e in self.prefills if not e.request.is_finished]
        self.decodes = [e for e in self.decodes if not e.request.is_finished]


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_preemptions: int


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        #: the context a request may fill: the model's, or the whole pool plus the never-cached last token
        self.max_len = min(config.max_model_len, config.num_blocks * config.block_size + 1)
        self.waiting: list[Request] = []  # sorted by _order_key
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.num_preemptions = 0
        self._arrival_seq: dict[str, int] = {}
        self._counter = itertools.count()
        self._aborted: list[Request] = []  # aborted since the last update(), reported by it
        self._last_finished: dict[str, Request] = {}  # finished by the last update(), for finish_request

    # ---- requests in and out ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; raise a ``RequestError`` or ``KVCacheExhaustedError`` if it can't run."""
        rid = request.request_id
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use", hint="give every request a unique id")
        if request.status is not RequestStatus.WAITING or request.output_token_ids or request.block_ids:
            raise RequestError(
                f"request {rid!r} was already scheduled once", hint="submit a new Request object"
            )
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise RequestError(f"request {rid!r} has an empty prompt", hint="pass at least one prompt token")
        max_model_len = self.config.max_model_len
        if num_prompt >= max_model_len:
            raise PromptTooLongError(
                f"request {rid!r}: the prompt has {num_prompt} tokens, but max_model_len is {max_model_len} "
                f"and at least one token must be generated, so a prompt may have at most {max_model_len - 1}",
                hint="shorten or truncate the prompt, or raise max_model_len (up to the model's context)",
            )
        bm = self.block_manager
        if bm.blocks_for(num_prompt) > bm.num_blocks:
            raise KVCacheExhaustedError(
                f"request {rid!r}: the prompt has {num_prompt} tokens and needs {bm.blocks_for(num_prompt)} "
                f"KV-cache blocks of {bm.block_size} tokens, but the whole pool has {bm.num_blocks}",
                hint="give the KV cache more memory (more blocks), or shorten the prompt",
            )
        request.num_computed_tokens = 0
        self.requests[rid] = request
        self._arrival_seq[rid] = next(self._counter)
        bisect.insort(self.waiting, request, key=self._order_key)

    def abort_request(self, request_id: str) -> Request | None:
        """Cancel a request now: its blocks are freed and it is reported by the next ``update()``.

        Returns the request, or None if the id is unknown or already finished (aborts may race finishing).
        """
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._retire(request, "abort", None)
        self._aborted.append(request)
        return request

    def finish_request(
        self, request_id: str, reason: str = "stop", stop_reason: int | str | None = None
    ) -> Request | None:
        """Finish a request for a reason found outside the scheduler (a stop string, after detokenising).

        Works on an unfinished request (freed now; not reported again by ``update()``: the caller reports it)
        and on one the last ``update()`` finished, whose reason is then overridden — a stop string in the
        token that also reached ``max_tokens`` finishes with "stop". Returns None for an unknown id.
        """
        request = self.requests.get(request_id)
        if request is not None:
            self._retire(request, reason, stop_reason)
            return request
        request = self._last_finished.get(request_id)
        if request is not None and request.finish_reason != "abort":
            request.finish(reason, stop_reason)
        return request

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def _retire(self, request: Request, reason: str, stop_reason: int | str | None) -> None:
        outputs = request.output_token_ids
        while outputs and outputs[-1] == PLACEHOLDER_TOKEN:  # tokens still in flight are dropped
            outputs.pop()
        request.finish(reason, stop_reason)
        self.block_manager.free(request)
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        del self.requests[request.request_id]
        del self._arrival_seq[request.request_id]

    # ---- the step -----------------------------------------------------------------------------------------
    def _order_key(self, request: Request) -> tuple[int, float, int]:
        return (request.priority, request.arrival_time, self._arrival_seq[request.request_id])

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: dict[str, ScheduledEntry] = {}  # by request id: the entries a later preemption takes back
        budget = self._schedule_running(out, scheduled, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._admit_waiting(out, scheduled, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, scheduled: dict[str, ScheduledEntry], budget: int) -> int:
        """Steps 1 and 2 of ``schedule()``; returns the budget left.

        A request in the steady decode state whose next token fits the blocks it holds needs no block manager
        call: its entry is made in the first pass, which collects the partial prefills for the second.
        """
        block_size = self.block_manager.block_size
        running_status = RequestStatus.RUNNING
        prefilling: list[Request] = []
        for request in list(self.running):  # a copy: preemption removes requests from ``running``
            if budget == 0:
                break
            if request.status is not running_status:  # preempted earlier in this step
                continue
            start = request.num_computed_tokens
            outputs = request.output_token_ids
            if not outputs or start != len(request.prompt_token_ids) + len(outputs) - 1:  # not in_decode_phase
                prefilling.append(request)
                continue
            if self._stops_by_length(request):  # its in-flight token is its last
                continue
            if start >= len(request.block_ids) * block_size:  # its next token starts a new block
                allocated, freed_budget = self._allocate_or_preempt(request, 1, out, scheduled)
                budget += freed_budget
                if not allocated:
                    continue
            entry = ScheduledEntry(request, 1, start, True)
            out.decodes.append(entry)
            scheduled[request.request_id] = entry
            budget -= 1
        for request in prefilling:
            if budget == 0:
                break
            if request.status is not running_status or self._stops_by_length(request):
                continue
            num_new = request.num_pending_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    continue
                num_new = budget
            allocated, freed_budget = self._allocate_or_preempt(request, num_new, out, scheduled)
            budget += freed_budget
            if allocated:
                self._add_entry(out, scheduled, request, num_new)
                budget -= num_new
        if out.preempted:  # drop the entries that preemption took back
            out.decodes = [e for e in out.decodes if scheduled.get(e.request.request_id) is e]
            out.prefills = [e for e in out.prefills if scheduled.get(e.request.request_id) is e]
        return budget

    def _allocate_or_preempt(
        self, request: Request, num_new: int, out: SchedulerOutput, scheduled: dict[str, ScheduledEntry]
    ) -> tuple[bool, int]:
        """Blocks for ``num_new`` more tokens of ``request``, preempting the last running request in
        ``(priority, arrival_time)`` order while none are free. Returns whether ``request`` got them (False when
        it was preempted itself) and the budget given back by the entries of the preempted requests."""
        freed_budget = 0
        while not self.block_manager.allocate_for(request, num_new):
            victim = max(self.running, key=self._order_key)
            self._preempt(victim)
            out.preempted.append(victim)
            unscheduled = scheduled.pop(victim.request_id, None)
            if unscheduled is not None:
                freed_budget += unscheduled.num_new_tokens
            if victim is request:
                return False, freed_budget
        return True, freed_budget

    def _admit_waiting(self, out: SchedulerOutput, scheduled: dict[str, ScheduledEntry], budget: int) -> None:
        """Step 3 of ``schedule()``: waiting requests in order, while the first of them fits."""
        cfg = self.config
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            num_new = request.num_tokens - bm.num_cached_prefix_tokens(request)
            if num_new > budget:
                if not cfg.enable_chunked_prefill:
                    break
                num_new = budget
            if not bm.allocate_for(request, num_new):
                break
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_entry(out, scheduled, request, num_new)
            budget -= num_new

    @staticmethod
    def _add_entry(
        out: SchedulerOutput, scheduled: dict[str, ScheduledEntry], request: Request, num_new: int
    ) -> None:
        """Schedule ``num_new`` tokens of ``request`` from its first uncomputed one (its blocks are allocated)."""
        start = request.num_computed_tokens
        entry = ScheduledEntry(request, num_new, start, sample=start + num_new == request.num_tokens)
        is_decode = num_new == 1 and request.in_decode_phase
        (out.decodes if is_decode else out.prefills).append(entry)
        scheduled[request.request_id] = entry

    def commit(self, output: SchedulerOutput) -> None:
        """The step is launched: advance computed tokens and give each sampling entry a placeholder output."""
        for entry in output.entries:
            request = entry.request
            request.num_computed_tokens += entry.num_new_tokens
            if entry.sample:
                request.output_token_ids.append(PLACEHOLDER_TOKEN)
        output.committed = True

    def _stops_by_length(self, request: Request) -> bool:
        """Whether the request's in-flight tokens already reach its length limits."""
        outputs = request.output_token_ids
        if not outputs or outputs[-1] != PLACEHOLDER_TOKEN:
            return False
        max_tokens = request.sampling_params.max_tokens
        num_output = len(outputs)
        return (max_tokens is not None and num_output >= max_tokens) or (
            len(request.prompt_token_ids) + num_output >= self.max_len
        )

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(request)
        bisect.insort(self.waiting, request, key=self._order_key)

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]) -> list[Request]:
        """Record a step's results; return the requests that finished (including aborts since last update).

        ``sampled_token_ids[request_id]``: the token(s) sampled for each entry with ``sample=True``.
        Entries whose request was aborted or finished after ``schedule()`` are ignored. For a committed step the
        tokens replace the entries' placeholders (also for a request preempted meanwhile).
        """
        finished, self._aborted = self._aborted, []
        mark_computed = self.block_manager.mark_computed
        committed = output.committed
        running_status = RequestStatus.RUNNING
        for entry in output.entries:
            request = entry.request
            status = request.status
            if status is not running_status:
                if not committed or status.is_finished:
                    continue
            elif not committed:
                request.num_computed_tokens += entry.num_new_tokens
            if not entry.sample:
                if status is running_status:
                    mark_computed(request)
                continue
            token_ids = sampled_token_ids.get(request.request_id)
            if not token_ids:
                raise ValueError(f"update(): no sampled token for request {request.request_id!r}, which sampled")
            outputs = request.output_token_ids
            index = entry.start_pos + entry.num_new_tokens - len(request.prompt_token_ids)  # its place in outputs
            for position, token_id in enumerate(token_ids, index):
                if committed:
                    outputs[position] = token_id
                else:
                    outputs.append(token_id)
                stop = self._check_stop(request, position, token_id)
                if stop is not None:
                    del outputs[position + 1 :]
                    if request.status is running_status:
                        mark_computed(request)  # its full blocks stay cached once it is freed
                    self._retire(request, *stop)
                    finished.append(request)
                    break
            if request.status is running_status:
                # only now: a committed step's computed tokens end with the one just read back
                mark_computed(request)
        self._last_finished = {r.request_id: r for r in finished}
        return finished

    def _check_stop(self, request: Request, index: int, token_id: int) -> tuple[str, int | None] | None:
        """``(finish_reason, stop_reason)`` if ``token_id``, output token ``index``, ends the request, else None."""
        params = request.sampling_params
        num_output = index + 1
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return "stop", None
            if token_id in params.stop_token_ids:  # type: ignore[operator]
                return "stop", token_id
        max_tokens = params.max_tokens
        if max_tokens is not None and num_output >= max_tokens:
            return "length", None
        if len(request.prompt_token_ids) + num_output >= self.max_len:
            return "length", None
        return None

    # ---- stats --------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Unfinished requests, or aborted ones the next ``update()`` still has to report."""
        return bool(self.requests) or bool(self._aborted)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_hit_rate=self.block_manager.prefix_cache_hit_rate,
            num_preemptions=self.num_preemptions,
        )
