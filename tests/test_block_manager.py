"""BlockManager: reference counts, block tables, prefix caching by chained hash, LRU eviction (no torch)."""

from __future__ import annotations

import pytest

from autodeploy.executor.block_manager import BlockManager
from autodeploy.executor.request import Request

BS = 4


def make(rid: str, tokens: list[int], output: list[int] | None = None) -> Request:
    request = Request(rid, tokens)
    request.output_token_ids = list(output or [])
    return request


def compute_all(bm: BlockManager, request: Request) -> None:
    """Allocate and 'compute' every known token but the last (as a step that samples would)."""
    assert bm.allocate_for(request, request.num_tokens - request.num_computed_tokens)
    request.num_computed_tokens = request.num_tokens
    bm.mark_computed(request)


def test_allocate_free_and_slots():
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make("a", list(range(10)))
    assert bm.can_allocate(r, 10)
    assert bm.allocate_for(r, 10)
    assert len(r.block_ids) == 3 and bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    assert bm.block_table(r) is r.block_ids
    for pos in range(10):
        assert bm.slot_of(r, pos) == r.block_ids[pos // BS] * BS + pos % BS
    assert bm.slots_of(r, 2, 9) == [bm.slot_of(r, p) for p in range(2, 9)]
    r.num_computed_tokens = 10
    assert bm.allocate_for(r, 2)  # 12 tokens still fit in 3 blocks
    assert len(r.block_ids) == 3
    assert bm.allocate_for(r, 3)
    assert len(r.block_ids) == 4
    bm.check_invariants([r])
    bm.free(r)
    assert r.block_ids == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants([])


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make("a", list(range(8)))
    assert bm.allocate_for(a, 8)
    b = make("b", list(range(100, 109)))
    assert not bm.can_allocate(b, 9)
    assert not bm.allocate_for(b, 9)
    assert b.block_ids == [] and b.num_computed_tokens == 0 and bm.num_free_blocks == 1
    assert bm.allocate_for(b, 4)
    bm.check_invariants([a, b])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)


def test_prefix_reuse_of_freed_blocks_and_counters():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make("a", list(range(10)))  # 2 full blocks + 2 tokens
    compute_all(bm, a)
    a_blocks = list(a.block_ids)
    bm.free(a)
    assert bm.num_free_blocks == 16  # cached blocks count as free
    b = make("b", list(range(8)) + [50, 51, 52])
    assert bm.num_cached_prefix_tokens(b) == 8
    assert bm.allocate_for(b, 3)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_ids[:2] == a_blocks[:2] and len(b.block_ids) == 3
    assert b.block_ids[2] not in a_blocks[:2]
    assert bm.prefix_cache_queries == 10 + 11 and bm.prefix_cache_hits == 8
    assert bm.prefix_cache_hit_rate == pytest.approx(8 / 21)
    bm.check_invariants([b])


def test_prefix_hit_never_covers_whole_sequence():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make("a", list(range(8)))
    compute_all(bm, a)
    bm.free(a)
    b = make("b", list(range(8)))  # the same 2 full blocks: the last token must be recomputed
    assert bm.num_cached_prefix_tokens(b) == 4
    c = make("c", list(range(9)))
    assert bm.num_cached_prefix_tokens(c) == 8


def test_live_blocks_are_shared_and_refcounted():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make("a", list(range(9)))
    compute_all(bm, a)
    b = make("b", list(range(8)) + [7, 7])
    assert bm.allocate_for(b, 2)
    shared = a.block_ids[:2]
    assert b.block_ids[:2] == shared
    assert [bm.blocks[i].ref_count for i in shared] == [2, 2]
    bm.check_invariants([a, b])
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in shared] == [1, 1]
    bm.check_invariants([b])
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16


def test_chained_hash_needs_the_same_parent():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute_all(bm, a)
    bm.free(a)
    # block [5, 6, 7, 8] is cached, but only after [1, 2, 3, 4]
    assert bm.num_cached_prefix_tokens(make("b", [5, 6, 7, 8, 0])) == 0
    assert bm.num_cached_prefix_tokens(make("c", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0
    assert bm.num_cached_prefix_tokens(make("d", [1, 2, 3, 4, 5, 6, 7, 0, 9])) == 4


def test_generated_tokens_are_cached_too():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make("a", [1, 2, 3], output=[4, 5, 6, 7, 8, 9])
    compute_all(bm, a)
    bm.free(a)
    b = make("b", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert bm.num_cached_prefix_tokens(b) == 8


def test_lru_eviction_prefers_plain_blocks_then_oldest_cached():
    bm = BlockManager(num_blocks=6, block_size=BS)
    old = make("old", [1] * 4 + [2])
    new = make("new", [3] * 4 + [4])
    compute_all(bm, old)
    compute_all(bm, new)
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 6
    filler = make("f", [9] * 20)  # 4 blocks: 2 never used, 2 freed partial tails (uncached) ...
    assert bm.allocate_for(filler, 16)
    assert bm.num_cached_prefix_tokens(make("q1", [1] * 4 + [0])) == 4
    assert bm.num_cached_prefix_tokens(make("q2", [3] * 4 + [0])) == 4
    filler.num_computed_tokens = 16
    assert bm.allocate_for(filler, 4)  # ... a 5th block evicts the least recently freed cached block
    assert bm.num_cached_prefix_tokens(make("q3", [1] * 4 + [0])) == 0
    assert bm.num_cached_prefix_tokens(make("q4", [3] * 4 + [0])) == 4
    bm.check_invariants([filler])


def test_duplicate_blocks_keep_the_first_registered():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make("a", list(range(6)))
    b = make("b", list(range(6)))
    assert bm.allocate_for(a, 6) and bm.allocate_for(b, 6)  # both before either is computed: no sharing
    assert not set(a.block_ids) & set(b.block_ids)
    for r in (a, b):
        r.num_computed_tokens = 6
        bm.mark_computed(r)
    assert bm.cached[bm.blocks[a.block_ids[0]].hash] == a.block_ids[0]
    bm.check_invariants([a, b])
    bm.free(b)
    bm.free(a)
    bm.check_invariants([])
    assert bm.allocate_for(make("c", list(range(6))), 2)


def test_disabled_prefix_caching():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make("a", list(range(9)))
    compute_all(bm, a)
    bm.free(a)
    b = make("b", list(range(9)))
    assert bm.num_cached_prefix_tokens(b) == 0
    assert bm.allocate_for(b, 9) and b.num_computed_tokens == 0
    assert bm.prefix_cache_queries == 0 and bm.prefix_cache_hits == 0 and not bm.cached
    bm.check_invariants([b])


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make("a", list(range(9)))
    compute_all(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_prefix_tokens(make("b", list(range(9)))) == 0
    assert bm.num_free_blocks == 8
    bm.check_invariants([])
