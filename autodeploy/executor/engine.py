"""The engine: the step loop shared by ``LLM``, ``generate_async`` and the server.

One step: ``scheduler.schedule()`` → ``runner.execute`` (logits of the sampled tokens) → ``sampler`` on the
device → ``scheduler.update`` → detokenise, check stop strings, publish outputs. ``generate`` drives steps in
the caller's thread; ``generate_async`` (and the server) run them in one background thread, so any number of
callers share one batch. A request with ``n > 1`` runs as ``n`` sequences that share the prompt's KV blocks
through the prefix cache, and is published as one ``RequestOutput`` with ``n`` completions.

A step that raises fails only the requests it held (their streams get the error); the engine keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from ..config import AutoDeployConfig
from ..errors import RequestError
from ..models import ModelFactory
from ..transforms import SharedContext
from .engine_setup import build_runner
from .outputs import RequestOutput
from .model_runner import TokenFill
from .request import PLACEHOLDER_TOKEN, Request
from .request_state import RequestState
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import ScheduledEntry, Scheduler, SchedulerConfig, SchedulerOutput

logger = logging.getLogger("autodeploy.executor")

Prompt = str | list[int]


class _HostTokens:
    """Sampled token ids on their way to the host: a non-blocking copy into pinned memory and its event."""

    def __init__(self, token_ids: torch.Tensor):
        if token_ids.device.type == "cuda":
            self.host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self.host.copy_(token_ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = token_ids, None

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _to_host(result: Any) -> _HostTokens | None:
    return None if result is None else _HostTokens(result.token_ids)


@dataclass
class _Launched:
    out: SchedulerOutput
    rows: list[Request]  # the requests sampled, in the order of the sampler's rows
    result: Any  # SamplerOutput (device tensors) or None when nothing was sampled
    host_tokens: _HostTokens | None


def _token_fill(entries: list[ScheduledEntry], previous: _Launched) -> TokenFill | None:
    """The entries whose last new token is a placeholder the previous step sampled: read it on the device."""
    row_of = {request: row for row, request in enumerate(previous.rows)}
    entry_indices: list[int] = []
    source_rows: list[int] = []
    for i, entry in enumerate(entries):
        request = entry.request
        row = row_of.get(request)
        if row is None:
            continue
        outputs = request.output_token_ids
        num_tokens = len(request.prompt_token_ids) + len(outputs)
        if outputs[-1] == PLACEHOLDER_TOKEN and entry.start_pos + entry.num_new_tokens == num_tokens:
            entry_indices.append(i)
            source_rows.append(row)
    if not entry_indices:
        return None
    return TokenFill(entry_indices, source_rows, previous.result.token_ids)


class Engine:
    def __init__(self, gm: GraphModule, ctx: SharedContext, config: AutoDeployConfig, factory: ModelFactory):
        self.config = config
        self.factory = factory
        self.device = ctx.device
        self.tokenizer = factory.tokenizer
        self.eos_token_ids = factory.eos_token_ids
        self.max_seq_len = config.max_seq_len or min(factory.max_position_embeddings or 8192, 8192)
        self.runner, num_blocks = build_runner(gm, ctx, config, self.max_seq_len)
        self.vocab_size = factory.config.get_text_config().vocab_size
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_batch_size,
                max_num_batched_tokens=config.max_num_tokens,
                max_model_len=self.max_seq_len,
                block_size=config.kv_cache.block_size,
                num_blocks=num_blocks,
                enable_chunked_prefill=config.enable_chunked_prefill,
                enable_prefix_caching=config.enable_prefix_caching,
            )
        )
        self.sampler = Sampler()
        self._states: dict[str, RequestState] = {}  # by parent request id
        self._parent_of: dict[str, RequestState] = {}  # child request id -> its parent's state
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        #: callers blocked on ``_lock`` in add/abort; the step loop lets them in before its next step, since the
        #: lock is not fair and the loop would otherwise re-take it for step after step (starving the server)
        self._callers_waiting = 0
        self._callers_mutex = threading.Lock()
        self._loop_thread: threading.Thread | None = None
        self._closed = False
        self.last_sampled: dict[str, list[int]] = {}
        self.async_scheduling = config.async_scheduling
        self._inflight: _Launched | None = None

    # ---- requests -----------------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer, so prompts must be lists of token ids")
            return prompt, self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:  # would fail the embedding lookup, and with it every request in the same step
            raise RequestError(
                f"prompt token ids must be in [0, {self.vocab_size}) for this model, got {bad}",
                hint="check that the prompt was tokenized with this model's tokenizer",
            )
        return None, token_ids

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template", hint="send a plain prompt instead")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sink: Any = None,
    ) -> RequestState:
        """Queue a request; returns its state (outputs are published to ``sink`` or collected in the state)."""
        params = sampling_params or SamplingParams()
        text, token_ids = self.tokenize(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        with self._caller_lock():
            if request_id in self._states:
                raise RequestError(f"request id {request_id!r} is already in use")
            state = RequestState(request_id, text, token_ids, params, self.tokenizer, sink)
            for child in state.make_children(frozenset(self.eos_token_ids), priority):
                self.scheduler.add_request(child)  # validates; children share the prompt, so all pass or the first fails
                self._parent_of[child.request_id] = state
            self._states[request_id] = state
            self._wakeup.notify_all()
        return state

    def abort_request(self, request_id: str) -> None:
        with self._caller_lock():
            state = self._states.get(request_id)
            if state is None:
                return
            for child in state.children:
                self.scheduler.abort_request(child.request_id)
            self._wakeup.notify_all()

    @contextlib.contextmanager
    def _caller_lock(self) -> Iterator[None]:
        """``_lock`` for a caller thread, taken before the step loop's next step (see ``_callers_waiting``)."""
        with self._callers_mutex:
            self._callers_waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._callers_mutex:
                self._callers_waiting -= 1
        try:
            yield
        finally:
            self._wakeup.notify_all()
            self._lock.release()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the outputs it published: streamed requests and finished ones.

        With asynchronous scheduling the batch is launched before the previous one's tokens are read back, so
        the host work of one step (scheduling, packing, sampling set-up, detokenising) overlaps the GPU work of
        the other; outputs then lag one step. ``last_sampled`` maps each sequence that got tokens in the
        published step to them (benchmarks, metrics).
        """
        with self._lock:
            self.last_sampled = {}
            out = self.scheduler.schedule()
            previous, self._inflight = self._inflight, None
            outputs: list[RequestOutput] = []
            defer = self.async_scheduling and not out.is_empty and not self._needs_host_tokens(out)
            if previous is not None and not defer:
                outputs += self._finish(previous)  # this step needs the previous tokens on the host
                previous = None
                out.drop_finished()
            if out.is_empty:
                return outputs + self._publish(out, {}, {}, self.scheduler.update(out, {}))
            try:
                launched = self._launch(out, previous)
            except Exception as e:  # a failing step fails its requests, not the engine
                logger.exception("step failed; aborting its %d requests", len(out.entries))
                self._fail(out, e)
                return outputs + (self._finish(previous) if previous is not None else [])
            if defer:
                self.scheduler.commit(out)
                self._inflight = launched
                return outputs + (self._finish(previous) if previous is not None else [])
            return outputs + self._finish(launched)

    @staticmethod
    def _needs_host_tokens(out: SchedulerOutput) -> bool:
        """Penalties read the previous tokens on the host when the sampling batch is built."""
        for entry in out.entries:
            if entry.sample:
                p = entry.request.sampling_params
                if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                    return True
        return False

    def _launch(self, out: SchedulerOutput, previous: _Launched | None) -> _Launched:
        """Run the model and the sampler for ``out``; nothing waits for the GPU."""
        entries = out.entries
        fill = _token_fill(entries, previous) if previous is not None else None
        logits = self.runner.execute(out.prefills, out.decodes, fill)  # [N, V]
        rows = [e.request for e in entries if e.sample]
        result = None
        if rows:
            batch = self.sampler.batch_for(rows, self._generators(rows), self.device, self.vocab_size)
            result = self.sampler(logits[:, : self.vocab_size], batch)
        return _Launched(out, rows, result, _to_host(result))

    def _finish(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's tokens, record them and publish."""
        sampled: dict[str, list[int]] = {}
        extras: dict[str, Any] = {}
        if launched.result is not None:
            tokens = launched.host_tokens.wait()
            sampled = {r.request_id: [t] for r, t in zip(launched.rows, tokens)}
            if launched.result.logprobs is not None:
                extras = self._logprob_extras(launched.rows, launched.result)
        finished = self.scheduler.update(launched.out, sampled)
        return self._publish(launched.out, sampled, extras, finished)

    def _generators(self, rows: list[Request]) -> list[torch.Generator | None]:
        parent_of, device = self._parent_of, self.device
        return [None if r.sampling_params.seed is None else parent_of[r.request_id].generator_for(r, device)
                for r in rows]

    def _logprob_extras(self, rows: list[Request], result: Any) -> dict[str, Any]:
        sampled_lp = result.logprobs.tolist()
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_vals = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        extras = {}
        for i, request in enumerate(rows):
            k = request.sampling_params.logprobs
            if k is None:
                continue
            top = list(zip(top_ids[i][:k], top_vals[i][:k])) if top_ids is not None else []
            extras[request.request_id] = (sampled_lp[i], top)
        return extras

    def _publish(
        self,
        out: SchedulerOutput,
        sampled: dict[str, list[int]],
        extras: dict[str, Any],
        finished: list[Request],
    ) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        now = time.monotonic()
        parent_of = self._parent_of
        for request_id, tokens in sampled.items():
            state = parent_of.get(request_id)
            if state is None:
                continue
            stop = state.on_tokens(request_id, tokens, extras.get(request_id), now)
            if stop is not None:
                child = state.child(request_id)
                if not child.is_finished:
                    self.scheduler.finish_request(request_id, "stop", stop)
                    state.on_finished(child)
            touched[state.request_id] = state
        for request in finished:
            state = parent_of.get(request.request_id)
            if state is not None:
                state.on_finished(request)
                touched[state.request_id] = state
        self.last_sampled.update(sampled)
        outputs = []
        for state in touched.values():  # only streams and finished requests need an output object now
            finished = state.finished
            if state.sink is not None or finished:
                outputs.append(state.publish(now))
            if finished:
                self._forget(state)
        return outputs

    def _fail(self, out: SchedulerOutput, error: Exception) -> None:
        failed = {self._parent_of[e.request_id] for e in out.entries if e.request_id in self._parent_of}
        for state in failed:
            for child in state.children:
                self.scheduler.abort_request(child.request_id)
            state.fail(error)
            self._forget(state)

    def _forget(self, state: RequestState) -> None:
        self._states.pop(state.request_id, None)
        for child in state.children:
            self._parent_of.pop(child.request_id, None)

    # ---- synchronous generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise RequestError(f"{len(params)} sampling params for {len(batch)} prompts")
        states = [self.add_request(p, sp) for p, sp in zip(batch, params)]
        from tqdm.auto import tqdm

        with tqdm(total=len(states), desc="Generating", disable=not use_tqdm) as bar:
            done = 0
            while not all(s.finished for s in states):
                if self._loop_thread is not None and self._loop_thread.is_alive():
                    with self._lock:
                        self._wakeup.wait(timeout=0.05)
                else:
                    self.step()
                now_done = sum(s.finished for s in states)
                bar.update(now_done - done)
                done = now_done
        for state in states:
            state.raise_if_failed()
        return [s.final_output() for s in states]

    # ---- asynchronous generation --------------------------------------------------------------------------
    async def generate_async(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a ``RequestOutput`` for every step that changed the request; the last has ``finished``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                pass

        state = self.add_request(prompt, sampling_params, request_id, priority, sink=sink)
        self._ensure_loop()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not state.finished:  # the consumer went away (client disconnect): free its blocks
                self.abort_request(state.request_id)

    def _ensure_loop(self) -> None:
        with self._lock:
            if self._loop_thread is None or not self._loop_thread.is_alive():
                self._loop_thread = threading.Thread(target=self._run_loop, name="autodeploy-engine", daemon=True)
                self._loop_thread.start()

    def _run_loop(self) -> None:
        while not self._closed:
            with self._lock:
                while not self._closed and (self._callers_waiting or not self.has_unfinished_requests()):
                    self._wakeup.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception:  # step() already fails the requests it can attribute; the loop must live on
                logger.exception("engine step failed")
            with self._lock:
                self._wakeup.notify_all()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the background loop after in-flight requests finish (or ``timeout`` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.has_unfinished_requests() and (deadline is None or time.monotonic() < deadline):
            if self._loop_thread is None:
                self.step()
            else:
                time.sleep(0.01)
        with self._lock:
            for request_id in list(self._states):
                self.abort_request(request_id)
            self._closed = True
            self._wakeup.notify_all()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=5)
        close = getattr(self.runner, "close", None)  # a tensor-parallel runner stops its worker ranks
        if close is not None:
            close()

    # ---- introspection ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s = self.scheduler.stats()
        return {
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
            "num_preemptions": s.num_preemptions,
            "num_blocks": self.scheduler.config.num_blocks,
            "num_free_blocks": self.scheduler.block_manager.num_free_blocks,
        }

