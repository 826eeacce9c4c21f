"""Asynchronous scheduling: step i+1 is scheduled and committed before step i's tokens reach the host.

The fake runner of test_scheduler.py resolves each placeholder input token from the previous step's sampled
tokens (as the model runner does on the device); results must equal synchronous scheduling exactly.
"""

from __future__ import annotations

import random

import pytest

from autodeploy.executor.block_manager import chain_hash
from autodeploy.executor.request import PLACEHOLDER_TOKEN, Request
from autodeploy.executor.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from test_scheduler import PROMPT, STREAM, VOCAB, FakeRunner, config, first_new, random_prompt, req, run_alone


class AsyncFakeRunner(FakeRunner):
    """schedule(i+1) -> run -> commit(i+1) -> update(i): the scheduler never waits for the tokens it feeds."""

    def __init__(self, scheduler: Scheduler):
        super().__init__(scheduler)
        self.pending: tuple[SchedulerOutput, dict[str, list[int]]] | None = None

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        previous = self.pending[1] if self.pending else {}
        for entry in out.entries:  # the device-side fill of in-flight tokens
            tokens = entry.request.output_token_ids
            for i, token in enumerate(tokens):
                if token == PLACEHOLDER_TOKEN and i == len(tokens) - 1:
                    assert entry.request_id in previous, "a placeholder must come from the previous step"
        original = Request.token_ids_between

        def resolved(request: Request, start: int, end: int) -> list[int]:
            ids = original(request, start, end)
            if ids and ids[-1] == PLACEHOLDER_TOKEN:
                ids = ids[:-1] + previous[request.request_id]
            return ids

        Request.token_ids_between = resolved
        try:
            for entry in out.decodes:  # the base class checks decodes feed the last token: compare resolved
                assert entry.token_ids[0] != PLACEHOLDER_TOKEN
            return _execute_without_last_token_check(self, out)
        finally:
            Request.token_ids_between = original

    def step(self) -> list[Request]:
        out = self.scheduler.schedule()
        finished: list[Request] = []
        if not out.is_empty:
            sampled = self.execute(out)
            self.scheduler.commit(out)
        if self.pending is not None:
            finished += self.scheduler.update(*self.pending)
        self.pending = (out, sampled) if not out.is_empty else None
        if out.is_empty:
            finished += self.scheduler.update(out, {})
        return finished


def _execute_without_last_token_check(runner: FakeRunner, out: SchedulerOutput) -> dict[str, list[int]]:
    last = {e.request_id: e.request.output_token_ids[-1] for e in out.decodes}
    for entry in out.decodes:
        if last[entry.request_id] == PLACEHOLDER_TOKEN:
            entry.request.output_token_ids[-1] = entry.token_ids[0]  # so FakeRunner's check sees the value
    try:
        return FakeRunner.execute(runner, out)
    finally:
        for entry in out.decodes:
            if last[entry.request_id] == PLACEHOLDER_TOKEN:
                entry.request.output_token_ids[-1] = PLACEHOLDER_TOKEN


def run_async(scheduler: Scheduler, arrivals: dict[int, list[Request]]) -> list[Request]:
    runner = AsyncFakeRunner(scheduler)
    finished: list[Request] = []
    step = 0
    while scheduler.has_work() or arrivals or runner.pending:
        for request in arrivals.pop(step, []):
            scheduler.add_request(request)
        finished += runner.step()
        step += 1
        assert step < 100_000
    return finished


def test_async_stops_like_sync():
    eos, at = first_new(STREAM, 2)
    stop, stop_at = first_new(STREAM, 3)
    cases = [
        req("len", PROMPT, max_tokens=5),
        req("eos", PROMPT, max_tokens=40, eos_token_ids=[eos]),
        req("stop", PROMPT, max_tokens=40, stop_token_ids=[stop]),
        req("ctx", PROMPT, max_tokens=None),
    ]
    for r in cases:
        sched = Scheduler(config(max_model_len=20))
        (done,) = run_async(sched, {0: [r]})
        assert PLACEHOLDER_TOKEN not in done.output_token_ids
        assert (done.output_token_ids, done.finish_reason, done.stop_reason) == run_alone(r, 20)
        assert sched.block_manager.num_free_blocks == sched.config.num_blocks


@pytest.mark.parametrize("chunked, prefix_caching", [(True, True), (False, False)])
def test_async_stress_with_preemption_matches_running_alone(chunked, prefix_caching):
    rng = random.Random(11 + chunked)
    max_model_len = 96
    prefixes = [random_prompt(rng, n) for n in (0, 5, 12)]
    arrivals: dict[int, list[Request]] = {}
    requests = []
    for i in range(120):
        prompt = rng.choice(prefixes) + random_prompt(rng, rng.randint(1, 30))
        max_tokens = rng.choice([None, rng.randint(1, 30)])
        r = req(
            f"r{i}", prompt, max_tokens=max_tokens,
            eos_token_ids=rng.sample(range(VOCAB), rng.choice([0, 1])),
            stop_token_ids=rng.sample(range(VOCAB), rng.choice([0, 0, 1])),
            priority=rng.choice([0, 0, 1]), arrival_time=float(i),
        )
        requests.append(r)
        arrivals.setdefault(rng.randint(0, 100), []).append(r)
    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=10, max_num_batched_tokens=48 if chunked else max_model_len, max_model_len=max_model_len,
            block_size=4, num_blocks=24, enable_chunked_prefill=chunked, enable_prefix_caching=prefix_caching,
        )
    )
    finished = run_async(sched, arrivals)
    assert len(finished) == 120
    assert sched.num_preemptions > 10
    assert sched.block_manager.num_free_blocks == 24
    for r in requests:
        assert (r.output_token_ids, r.finish_reason, r.stop_reason) == run_alone(r, max_model_len), r.request_id


def test_async_prefix_cache_hashes_only_known_tokens():
    """A block the in-flight token completes is hashed once that token is known, never over its placeholder."""
    sched = Scheduler(config())
    r = req("hashes", PROMPT, max_tokens=21)
    (done,) = run_async(sched, {0: [r]})
    tokens = done.prompt_token_ids + done.output_token_ids
    bs = sched.config.block_size
    expected: list[bytes] = []
    for i in range(len(done.block_hashes)):
        expected.append(chain_hash(expected[-1] if expected else None, tokens[i * bs : (i + 1) * bs]))
    assert len(done.block_hashes) >= (len(tokens) - 1) // bs
    assert done.block_hashes == expected
    again = req("again", tokens[:-1], max_tokens=1)
    assert sched.block_manager.num_cached_prefix_tokens(again) == (len(tokens) - 2) // bs * bs
