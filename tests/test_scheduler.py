"""Scheduler, Request and SamplingParams on CPU with a fake runner (no torch).

The fake runner stores, per cache slot, the token id written there (slots come from the request's block
table) and produces the next token as a hash of the token ids it reads back through the block table for
positions ``[0, n)``. A wrong block table, a wrong prefix reuse or lost K/V therefore gives wrong tokens.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autodeploy.errors import ConfigError, KVCacheExhaustedError, PromptTooLongError, RequestError
from autodeploy.executor import block_manager as block_manager_module
from autodeploy.executor.request import Request, RequestStatus
from autodeploy.executor.sampling_params import SamplingParams
from autodeploy.executor.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50
_UNWRITTEN = 10**6  # what an empty slot reads as: any lost K/V changes the tokens


def next_token(seen: list[int]) -> int:
    h = 14695981039
    for t in seen:
        h = (h * 1000003 + t + 1) % (2**61 - 1)
    return h % VOCAB


def oracle(prompt: list[int], num: int) -> list[int]:
    seq = list(prompt)
    for _ in range(num):
        seq.append(next_token(seq))
    return seq[len(prompt) :]


class FakeRunner:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.bm = scheduler.block_manager
        cfg = scheduler.config
        self.slots: list[int] = [_UNWRITTEN] * (cfg.num_blocks * cfg.block_size)
        self.num_unsampled_chunks = 0

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        cfg = self.scheduler.config
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.entries) <= cfg.max_num_seqs
        assert len({e.request_id for e in out.entries}) == len(out.entries)
        assert not {e.request_id for e in out.entries} & {r.request_id for r in out.preempted}
        for entry in out.decodes:
            assert entry.num_new_tokens == 1 and entry.sample
            assert entry.token_ids == [entry.request.last_token_id]
        for entry in out.entries:
            request = entry.request
            assert entry.num_new_tokens >= 1, "an entry must feed a token to get logits"
            assert entry.start_pos == request.num_computed_tokens
            assert entry.sample == (entry.start_pos + entry.num_new_tokens == request.num_tokens)
            for pos, token in zip(
                range(entry.start_pos, entry.start_pos + entry.num_new_tokens), entry.token_ids
            ):
                slot = self.bm.slot_of(request, pos)
                assert self.bm.blocks[slot // cfg.block_size].ref_count == 1, "write into a shared block"
                self.slots[slot] = token
        sampled = {}
        for entry in out.entries:
            if not entry.sample:
                self.num_unsampled_chunks += 1
                continue
            n = entry.start_pos + entry.num_new_tokens
            seen = [self.slots[self.bm.slot_of(entry.request, p)] for p in range(n)]
            sampled[entry.request_id] = [next_token(seen)]
        return sampled

    def step(self) -> list[Request]:
        out = self.scheduler.schedule()
        sampled = self.execute(out)
        return self.scheduler.update(out, sampled)


def run(
    scheduler: Scheduler, add_schedule: dict[int, list[Request]] | None = None, check: bool = True
) -> list[Request]:
    """Step until nothing is left; ``add_schedule[step]``: requests added before that step. Finished order."""
    runner = FakeRunner(scheduler)
    finished: list[Request] = []
    add_schedule = dict(add_schedule or {})
    step = 0
    while scheduler.has_work() or add_schedule:
        for request in add_schedule.pop(step, []):
            scheduler.add_request(request)
        finished += runner.step()
        if check:
            scheduler.block_manager.check_invariants(scheduler.requests.values())
        step += 1
        assert step < 100_000
    return finished


def config(**kw) -> SchedulerConfig:
    base = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        "max_model_len": 128,
        "block_size": 4,
        "num_blocks": 256,
    }
    return SchedulerConfig(**(base | kw))


def req(rid: str, prompt: list[int], max_tokens: int | None = 8, **kw) -> Request:
    params = {k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__}
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), **kw)


def clone(r: Request) -> Request:
    return Request(
        r.request_id, r.prompt_token_ids, r.sampling_params, r.eos_token_ids, r.arrival_time, r.priority
    )


def run_alone(r: Request, max_model_len: int) -> tuple[list[int], str | None, int | str | None]:
    sched = Scheduler(
        config(
            max_model_len=max_model_len,
            num_blocks=1024,
            max_num_batched_tokens=max_model_len,
            enable_chunked_prefill=False,
            enable_prefix_caching=False,
        )
    )
    (done,) = run(sched, {0: [clone(r)]})
    return done.output_token_ids, done.finish_reason, done.stop_reason


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


# ---- torch-free --------------------------------------------------------------------------------------------
def test_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import autodeploy.executor.sampling_params, autodeploy.executor.request\n"
        "import autodeploy.executor.block_manager, autodeploy.executor.scheduler\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- SamplingParams, Request -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("temperature", -1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("seed", "x"),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 20),
        ("stop", 5),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 3),
        ("ignore_eos", 1),
        ("logprobs", -1),
        ("include_stop_str_in_output", "yes"),
        ("skip_special_tokens", None),
    ],
)
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(field), str(info.value)
    assert isinstance(info.value, RequestError)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop, p.stop_token_ids) == (
        1,
        1.0,
        1.0,
        0,
        16,
        [],
        [],
    )
    assert not p.greedy and SamplingParams(temperature=0).greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    assert SamplingParams(top_k=-1, logprobs=0, seed=7).logprobs == 0
    assert (
        str(pytest.raises(ValueError, SamplingParams, temperature=-1).value)
        == "temperature must be >= 0, got -1"
    )


def test_request_properties_and_status():
    r = Request("r", [1, 2, 3], eos_token_ids=9)
    assert r.eos_token_ids == frozenset({9}) and r.status is RequestStatus.WAITING and not r.is_finished
    r.output_token_ids += [4, 5]
    assert r.all_token_ids == [1, 2, 3, 4, 5] and r.num_tokens == 5
    assert (r.num_prompt_tokens, r.num_output_tokens, r.last_token_id) == (3, 2, 5)
    for a in range(6):
        for b in range(a, 6):
            assert r.token_ids_between(a, b) == r.all_token_ids[a:b]
    assert [s.is_finished for s in RequestStatus] == [False, False, True, True, True]
    r.finish("length")
    assert r.status is RequestStatus.FINISHED_LENGTH and r.finish_reason == "length"
    with pytest.raises(RequestError, match="integers"):
        Request("bad", [1.5])
    with pytest.raises(RequestError, match=">= 0"):
        Request("bad", [-3])


# ---- typed errors ------------------------------------------------------------------------------------------
def test_request_errors():
    sched = Scheduler(config(max_model_len=32, num_blocks=4, max_num_batched_tokens=64))
    with pytest.raises(RequestError, match="empty prompt"):
        sched.add_request(req("e", []))
    with pytest.raises(PromptTooLongError) as info:
        sched.add_request(req("long", list(range(32))))
    assert "32 tokens" in str(info.value) and "max_model_len is 32" in str(info.value)
    assert "What to try" in str(info.value)
    with pytest.raises(KVCacheExhaustedError, match="needs 5 KV-cache blocks"):
        sched.add_request(req("big", list(range(17))))
    sched.add_request(req("ok", list(range(16))))  # exactly the whole pool: fine
    with pytest.raises(RequestError, match="already in use"):
        sched.add_request(req("ok", [1]))
    with pytest.raises(ConfigError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="chunked prefill"):
        SchedulerConfig(max_num_batched_tokens=16, max_model_len=64, enable_chunked_prefill=False)
    (done,) = run(sched)
    assert done.output_token_ids == oracle(list(range(16)), 1) and done.finish_reason == "length"


# ---- decoding ----------------------------------------------------------------------------------------------
def test_plain_decode_matches_oracle():
    rng = random.Random(0)
    requests = [
        req(f"r{i}", random_prompt(rng, rng.randint(1, 30)), max_tokens=rng.randint(1, 20)) for i in range(12)
    ]
    sched = Scheduler(config(enable_prefix_caching=False))
    finished = run(sched, {0: requests})
    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in requests)
    for r in requests:
        assert r.output_token_ids == oracle(r.prompt_token_ids, r.sampling_params.max_tokens)
        assert r.finish_reason == "length" and r.status is RequestStatus.FINISHED_LENGTH and r.block_ids == []
    assert sched.block_manager.num_free_blocks == 256 and not sched.has_work()


def test_step_structure_prefills_first_and_chunks_sample_nothing():
    sched = Scheduler(config(max_num_batched_tokens=10))
    runner = FakeRunner(sched)
    a = req("a", [1, 2, 3])
    sched.add_request(a)
    runner.step()
    b = req("b", list(range(20)))
    sched.add_request(b)
    out = sched.schedule()
    assert [e.request_id for e in out.prefills] == ["b"] and [e.request_id for e in out.decodes] == ["a"]
    assert out.entries == out.prefills + out.decodes
    (chunk,) = out.prefills
    assert (chunk.num_new_tokens, chunk.start_pos, chunk.sample) == (9, 0, False)
    assert out.num_batched_tokens == 10 and out.num_sampled == 1
    sched.update(out, runner.execute(out))
    out = sched.schedule()
    (chunk,) = out.prefills
    assert (chunk.num_new_tokens, chunk.start_pos, chunk.sample) == (9, 9, False)
    sched.update(out, runner.execute(out))
    out = sched.schedule()
    (chunk,) = out.prefills
    assert (chunk.num_new_tokens, chunk.start_pos, chunk.sample) == (2, 18, True)


@pytest.mark.parametrize("budget", [1, 5, 16])
def test_chunked_prefill_equals_unchunked(budget):
    rng = random.Random(1)
    prompts = [random_prompt(rng, rng.randint(10, 60)) for _ in range(6)]
    whole = Scheduler(
        config(max_num_batched_tokens=128, enable_chunked_prefill=False, enable_prefix_caching=False)
    )
    ref = [req(f"r{i}", p, max_tokens=10) for i, p in enumerate(prompts)]
    run(whole, {0: ref})
    chunked = Scheduler(config(max_num_batched_tokens=budget, enable_prefix_caching=False))
    got = [req(f"r{i}", p, max_tokens=10) for i, p in enumerate(prompts)]
    runner = FakeRunner(chunked)
    for r in got:
        chunked.add_request(r)
    while chunked.has_work():
        runner.step()
    assert runner.num_unsampled_chunks > 0  # some prompts really were split
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in ref]


def test_prefix_reuse_equals_no_reuse_and_counts_hits():
    rng = random.Random(2)
    shared = random_prompt(rng, 23)
    prompts = [shared + random_prompt(rng, rng.randint(0, 9)) for _ in range(8)] + [shared[:8], shared]

    def go(prefix_caching: bool) -> tuple[Scheduler, list[Request]]:
        sched = Scheduler(config(enable_prefix_caching=prefix_caching))
        requests = [req(f"r{i}", p, max_tokens=6) for i, p in enumerate(prompts)]
        run(sched, {i: [r] for i, r in enumerate(requests)})  # one arrives per step: later ones hit the cache
        return sched, requests

    plain_sched, plain = go(False)
    cached_sched, cached = go(True)
    assert [r.output_token_ids for r in cached] == [r.output_token_ids for r in plain]
    bm = cached_sched.block_manager
    assert bm.prefix_cache_hits >= 7 * 20 and 0 < bm.prefix_cache_hit_rate < 1
    assert max(r.num_cached_tokens for r in cached) == 20
    assert cached[-1].num_cached_tokens == 20  # 23 tokens = 5 full blocks + 3; the 6th block is recomputed
    assert plain_sched.block_manager.prefix_cache_hits == 0


def test_broken_prefix_hash_gives_wrong_tokens(monkeypatch):
    """The fake runner really checks reuse: a hash that ignores token ids reuses the wrong K/V."""
    rng = random.Random(3)
    prompts = [random_prompt(rng, 17) for _ in range(4)]
    expected = [oracle(p, 4) for p in prompts]
    real = block_manager_module.chain_hash
    monkeypatch.setattr(
        block_manager_module, "chain_hash", lambda parent, tokens: real(parent, [0] * len(tokens))
    )
    requests = [req(f"r{i}", p, max_tokens=4) for i, p in enumerate(prompts)]
    run(Scheduler(config()), {i: [r] for i, r in enumerate(requests)})
    assert [r.output_token_ids for r in requests] != expected


def test_preemption_gives_identical_tokens():
    rng = random.Random(4)
    requests = [
        req(f"r{i}", random_prompt(rng, rng.randint(4, 20)), max_tokens=24, arrival_time=float(i))
        for i in range(6)
    ]
    expected = {r.request_id: run_alone(r, 64) for r in requests}
    for prefix_caching in (False, True):
        sched = Scheduler(config(num_blocks=16, max_model_len=64, enable_prefix_caching=prefix_caching))
        got = [clone(r) for r in requests]
        run(sched, {0: got})
        assert sched.num_preemptions > 0 and sum(r.num_preemptions for r in got) == sched.num_preemptions
        for r in got:
            assert (r.output_token_ids, r.finish_reason, r.stop_reason) == expected[r.request_id]


def test_preemption_evicts_lowest_priority_then_latest():
    sched = Scheduler(config(num_blocks=8, max_model_len=32, max_num_batched_tokens=64))
    runner = FakeRunner(sched)
    a = req("a", [1] * 8, max_tokens=20, priority=0, arrival_time=2.0)
    b = req("b", [2] * 8, max_tokens=20, priority=1, arrival_time=0.0)
    c = req("c", [3] * 8, max_tokens=20, priority=0, arrival_time=1.0)
    for r in (a, b, c):
        sched.add_request(r)
    first_preempted = []
    while sched.has_work():
        out = sched.schedule()
        first_preempted += [r.request_id for r in out.preempted]
        sched.update(out, runner.execute(out))
    assert first_preempted[:2] == ["b", "a"]
    assert c.num_preemptions == 0


def test_decode_that_needs_a_block_takes_back_an_entry_made_earlier_in_the_step():
    """A decode whose next token fits its blocks is scheduled without the block manager; one that needs a block
    may preempt a request scheduled earlier in the same step, whose entry and budget are then taken back."""
    sched = Scheduler(config(max_num_batched_tokens=3, num_blocks=4, enable_prefix_caching=False))
    runner = FakeRunner(sched)
    a = req("a", [1] * 3, max_tokens=20, priority=1)  # admitted first, so first in running order; served last
    b, c = req("b", [2], max_tokens=20), req("c", [3] * 12, max_tokens=20)
    sched.add_request(a)
    runner.step()
    sched.add_request(b)
    sched.add_request(c)
    for _ in range(4):  # a and b decode, c prefills one token a step; a now holds 2 blocks, b and c 1 each
        runner.step()
    assert sched.block_manager.num_free_blocks == 0 and (a.num_computed_tokens, b.num_computed_tokens) == (7, 4)
    out = sched.schedule()  # a's token fits; b's starts a block: a is preempted after its entry was made
    assert [r.request_id for r in out.preempted] == ["a"] and a.status is RequestStatus.WAITING
    assert [(e.request_id, e.start_pos) for e in out.decodes] == [("b", 4)]
    assert [(e.request_id, e.start_pos, e.num_new_tokens) for e in out.prefills] == [("c", 4, 2)]  # a's token too
    sched.update(out, runner.execute(out))
    while sched.has_work():
        runner.step()
    for r in (a, b, c):  # the context is the 16-slot pool plus one token
        assert r.output_token_ids == oracle(r.prompt_token_ids, min(20, 17 - len(r.prompt_token_ids)))


def test_abort_frees_blocks():
    sched = Scheduler(config(num_blocks=32, max_num_seqs=2))
    runner = FakeRunner(sched)
    a, b, c = req("a", list(range(10)), max_tokens=50), req("b", [5] * 7, max_tokens=50), req("c", [9] * 5)
    for r in (a, b, c):
        sched.add_request(r)
    runner.step()
    runner.step()
    assert sched.num_running == 2 and sched.num_waiting == 1 and sched.kv_cache_usage > 0
    assert sched.abort_request("a") is a and sched.abort_request("c") is c
    assert sched.abort_request("a") is None and sched.abort_request("nope") is None
    assert a.status is RequestStatus.FINISHED_ABORTED and a.finish_reason == "abort" and a.block_ids == []
    assert sched.num_running == 1 and sched.num_waiting == 0
    sched.block_manager.check_invariants(sched.requests.values())
    finished = runner.step()
    assert finished[:2] == [a, c]
    sched.abort_request("b")
    assert sched.block_manager.num_free_blocks == 32 and sched.kv_cache_usage == 0.0
    assert sched.has_work() and not sched.has_unfinished_requests()
    out = sched.schedule()
    assert out.is_empty and sched.update(out, {}) == [b] and not sched.has_work()


def test_abort_between_schedule_and_update():
    sched = Scheduler(config())
    runner = FakeRunner(sched)
    a = req("a", [1, 2, 3])
    sched.add_request(a)
    out = sched.schedule()
    sampled = runner.execute(out)
    sched.abort_request("a")
    assert sched.update(out, sampled) == [a] and a.output_token_ids == [] and a.finish_reason == "abort"


def test_priorities_and_fcfs_order():
    sched = Scheduler(config(max_num_seqs=1))
    now = time.monotonic()
    requests = [
        req("late-urgent", [1], max_tokens=1, priority=-1, arrival_time=now + 3),
        req("first", [2], max_tokens=1, arrival_time=now),
        req("second", [3], max_tokens=1, arrival_time=now + 1),
        req("low", [4], max_tokens=1, priority=5, arrival_time=now - 10),
        req("second-tie", [5], max_tokens=1, arrival_time=now + 1),
    ]
    finished = run(sched, {0: requests})
    assert [r.request_id for r in finished] == ["late-urgent", "first", "second", "second-tie", "low"]


# ---- stopping ----------------------------------------------------------------------------------------------
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
STREAM = oracle(PROMPT, 40)


def first_new(tokens: list[int], start: int = 0) -> tuple[int, int]:
    """A token whose first occurrence in ``tokens`` is at index >= start, and that index."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return tokens[i], i
    raise AssertionError("no suitable token")


def finish_one(r: Request, **cfg) -> Request:
    sched = Scheduler(config(**cfg))
    (done,) = run(sched, {0: [r]})
    assert done is r and r.block_ids == [] and not sched.has_work()
    return r


def test_max_tokens_and_context_length():
    r = finish_one(req("a", PROMPT, max_tokens=5))
    assert r.output_token_ids == STREAM[:5] and r.finish_reason == "length" and r.stop_reason is None
    r = finish_one(req("b", PROMPT, max_tokens=None), max_model_len=20)
    assert r.output_token_ids == STREAM[:12] and r.finish_reason == "length"
    r = finish_one(
        req("c", PROMPT, max_tokens=None), max_model_len=200, num_blocks=5
    )  # the pool, 20 tokens + 1
    assert r.output_token_ids == STREAM[:13] and r.finish_reason == "length"


def test_eos_min_tokens_and_ignore_eos():
    eos, at = first_new(STREAM, 2)
    r = finish_one(req("a", PROMPT, max_tokens=40, eos_token_ids=[eos]))
    assert r.output_token_ids == STREAM[: at + 1] and r.finish_reason == "stop" and r.stop_reason is None
    assert r.status is RequestStatus.FINISHED_STOPPED
    r = finish_one(req("b", PROMPT, max_tokens=40, eos_token_ids=[eos], min_tokens=at + 2))
    later = STREAM.index(eos, at + 1) if eos in STREAM[at + 1 :] else None
    if later is None or later >= 40:
        assert r.output_token_ids == STREAM and r.finish_reason == "length"
    else:
        assert r.output_token_ids == STREAM[: later + 1] and r.finish_reason == "stop"
    r = finish_one(req("c", PROMPT, max_tokens=30, eos_token_ids=[eos], ignore_eos=True))
    assert r.output_token_ids == STREAM[:30] and r.finish_reason == "length"


def test_stop_token_ids():
    stop, at = first_new(STREAM, 3)
    r = finish_one(req("a", PROMPT, max_tokens=40, stop_token_ids=[stop]))
    assert r.output_token_ids == STREAM[: at + 1] and (r.finish_reason, r.stop_reason) == ("stop", stop)
    r = finish_one(req("b", PROMPT, max_tokens=40, stop_token_ids=[stop], ignore_eos=True))
    assert r.stop_reason == stop  # ignore_eos does not switch off stop_token_ids
    r = finish_one(req("c", PROMPT, max_tokens=at + 1, stop_token_ids=[stop], min_tokens=at + 1))
    assert (
        r.finish_reason == "stop" and r.num_output_tokens == at + 1
    )  # stop wins over length on the same token


def test_finish_request_for_stop_strings():
    sched = Scheduler(config())
    runner = FakeRunner(sched)
    a, b = req("a", PROMPT, max_tokens=10), req("b", PROMPT, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    assert runner.step() == [b] and b.finish_reason == "length"
    assert sched.finish_request("a", "stop", "###") is a
    assert (a.status, a.finish_reason, a.stop_reason) == (RequestStatus.FINISHED_STOPPED, "stop", "###")
    assert a.block_ids == [] and not sched.has_work()
    assert sched.finish_request("b", "stop", "\n") is b  # a stop string in the token that hit max_tokens
    assert (b.finish_reason, b.stop_reason) == ("stop", "\n")
    assert sched.finish_request("zzz") is None
    assert sched.block_manager.num_free_blocks == sched.config.num_blocks


def test_stats():
    sched = Scheduler(config(max_num_seqs=1))
    sched.add_request(req("a", PROMPT))
    sched.add_request(req("b", PROMPT))
    FakeRunner(sched).step()
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (1, 1, 0)
    assert stats.kv_cache_usage == pytest.approx(2 / 256)  # 8 tokens in blocks of 4


# ---- stress ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "chunked, prefix_caching", [(True, True), (True, False), (False, True), (False, False)]
)
def test_stress_preemption_matches_running_alone(chunked, prefix_caching):
    rng = random.Random(5 + 2 * chunked + prefix_caching)
    max_model_len = 96
    prefixes = [random_prompt(rng, n) for n in (0, 5, 12, 30)]
    arrivals: dict[int, list[Request]] = {}
    requests = []
    for i in range(200):
        prompt = rng.choice(prefixes) + random_prompt(rng, rng.randint(1, 30))
        max_tokens = rng.choice([None, rng.randint(1, 40)])
        r = req(
            f"r{i}",
            prompt,
            max_tokens=max_tokens,
            min_tokens=rng.choice([0, 0, min(3, max_tokens or 3)]),
            eos_token_ids=rng.sample(range(VOCAB), rng.choice([0, 1])),
            stop_token_ids=rng.sample(range(VOCAB), rng.choice([0, 0, 1])),
            priority=rng.choice([0, 0, 1, 2]),
            arrival_time=float(i),
        )
        requests.append(r)
        arrivals.setdefault(rng.randint(0, 150), []).append(r)
    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=12,
            max_num_batched_tokens=48 if chunked else max_model_len,
            max_model_len=max_model_len,
            block_size=4,
            num_blocks=24,
            enable_chunked_prefill=chunked,
            enable_prefix_caching=prefix_caching,
        )
    )
    finished = run(sched, arrivals)
    assert len(finished) == 200 and len({r.request_id for r in finished}) == 200
    print(
        f"preemptions={sched.num_preemptions} prefix_hit_rate={sched.block_manager.prefix_cache_hit_rate:.2f}"
    )
    assert sched.num_preemptions >= 50, sched.num_preemptions
    assert sched.block_manager.num_free_blocks == 24
    for r in requests:
        assert (r.output_token_ids, r.finish_reason, r.stop_reason) == run_alone(r, max_model_len), (
            r.request_id
        )
    if prefix_caching:
        assert sched.block_manager.prefix_cache_hits > 0
