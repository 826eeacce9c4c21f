"""The paged KV cache's bookkeeping: which blocks each request holds, and the prefix cache (no torch).

The pool has ``num_blocks`` blocks of ``block_size`` token slots; slot ``b * block_size + o`` is offset ``o``
of block ``b``. A request's block table is ``request.block_ids``.

Prefix caching: a block whose ``block_size`` slots all hold computed K/V is *full*; it gets a chained hash,
``hash(parent block's hash, the block's token ids)``, so equal hashes mean equal token prefixes (the hash is
a 128-bit BLAKE2b digest; collisions are not guarded against further). When a request first gets blocks,
its longest run of full-block prefixes already in the cache is reused instead of recomputed.

Invariants (``check_invariants`` verifies them):

* Every block is either *free* (``ref_count == 0``, in exactly one of the two free pools) or *used*
  (``ref_count`` = the number of requests whose block table holds it).
* A used block shared by several requests is full and registered: its slots are never written again.
  Requests only write at positions ``>= num_computed_tokens``, and a reused prefix ends at a block boundary.
* ``cached`` maps a hash to at most one block, and that block carries that hash. Free blocks with a
  registered hash sit in ``_free_cached`` (LRU order, oldest first) and keep their K/V until evicted; all
  other free blocks sit in ``_free_plain``. A fresh block comes from ``_free_plain`` first, then by evicting
  the least recently freed cached block (its hash is dropped).
* A prefix hit never covers a whole sequence: at least one token is recomputed, so the step yields logits.
* ``num_free_blocks`` counts both free pools: cached free blocks are reclaimable at any time.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from .request import Request


def chain_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """The prefix-cache key of a full block: a digest of the parent block's key and this block's tokens."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full of computed tokens (prefix caching only)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.cached: dict[bytes, int] = {}
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._num_hashed: dict[str, int] = {}  # request id -> how many leading blocks of its table are hashed
        #: prefix-cache counters, in tokens: looked up when a request is admitted / served from the cache
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- pool state ---------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- model-runner access ------------------------------------------------------------------------------
    def block_table(self, request: Request) -> list[int]:
        return request.block_ids

    def slot_of(self, request: Request, position: int) -> int:
        """The cache slot of token ``position`` of ``request`` (which must already have its block)."""
        return request.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def slots_of(self, request: Request, start: int, end: int) -> list[int]:
        bs = self.block_size
        table = request.block_ids
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # ---- prefix cache -------------------------------------------------------------------------------------
    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The chain hashes of the request's first ``num_blocks`` blocks (all full), computed once each."""
        hashes = request.block_hashes
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(
                chain_hash(hashes[-1] if hashes else None, request.token_ids_between(i * bs, (i + 1) * bs))
            )
        return hashes

    def _prefix_hits(self, request: Request) -> list[int]:
        """Blocks holding the request's longest cached full-block prefix, shorter than the whole sequence."""
        if not self.enable_prefix_caching or request.block_ids:
            return []
        hits: list[int] = []
        num_blocks = (request.num_tokens - 1) // self.block_size
        for key in self._block_hashes(request, num_blocks)[:num_blocks]:
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_cached_prefix_tokens(self, request: Request) -> int:
        """Tokens ``allocate_for`` would take from the prefix cache if called now (0 once it has blocks)."""
        return len(self._prefix_hits(request)) * self.block_size

    # ---- allocation ---------------------------------------------------------------------------------------
    def _num_fresh_needed(self, request: Request, hits: list[int], num_new_tokens: int) -> int:
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        held = len(request.block_ids) + len(hits)
        fresh = max(0, self.blocks_for(num_computed + num_new_tokens) - held)
        # cached hits that are currently free leave the free pool when taken
        return fresh + sum(1 for b in hits if self.blocks[b].ref_count == 0)

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Whether ``allocate_for(request, num_new_tokens)`` would succeed now."""
        hits = self._prefix_hits(request)
        return self._num_fresh_needed(request, hits, num_new_tokens) <= self.num_free_blocks

    def allocate_for(self, request: Request, num_new_tokens: int) -> bool:
        """Ensure ``request`` has blocks for ``num_computed_tokens + num_new_tokens`` tokens; False if not.

        On the first call for a request (its table is empty) the prefix cache is applied first:
        ``num_computed_tokens`` and ``num_cached_tokens`` advance by the reused tokens, so ``num_new_tokens``
        counts the tokens after the cached prefix (get the prefix length from ``num_cached_prefix_tokens``).
        On failure nothing changes.
        """
        table = request.block_ids
        if table and request.num_computed_tokens + num_new_tokens <= len(table) * self.block_size:
            return True  # the tokens fit in the blocks it holds (every decode step but one a block)
        first = not table
        hits = self._prefix_hits(request)
        if self._num_fresh_needed(request, hits, num_new_tokens) > self.num_free_blocks:
            return False
        if first:
            for block_id in hits:
                self._take(block_id)
            request.block_ids.extend(hits)
            num_hit_tokens = len(hits) * self.block_size
            request.num_computed_tokens += num_hit_tokens
            self._num_hashed[request.request_id] = len(hits)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_hit_tokens
                if request.num_preemptions == 0:
                    request.num_cached_tokens = num_hit_tokens
        need = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        for _ in range(need):
            request.block_ids.append(self._take_fresh())
        return True

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        if self._free_plain:
            block_id = self._free_plain.pop()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            block = self.blocks[block_id]
            assert block.hash is not None
            del self.cached[block.hash]
            block.hash = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def mark_computed(self, request: Request) -> None:
        """Hash and register the blocks that ``num_computed_tokens`` has filled since the last call."""
        if not self.enable_prefix_caching or not request.block_ids:
            return
        start = self._num_hashed.get(request.request_id, 0)
        end = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if end <= start:
            return
        hashes = self._block_hashes(request, end)
        for i in range(start, end):
            block = self.blocks[request.block_ids[i]]
            block.hash = hashes[i]
            self.cached.setdefault(hashes[i], block.block_id)  # an equal block computed earlier stays the one
        self._num_hashed[request.request_id] = end

    def free(self, request: Request) -> None:
        """Drop the request's hold on its blocks (tail first: evicted first) and clear its table."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                self._free_cached[block_id] = None
            else:
                block.hash = None
                self._free_plain.append(block_id)
        request.block_ids.clear()
        self._num_hashed.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request holds (e.g. after new weights are loaded)."""
        for block_id in self._free_cached:
            block = self.blocks[block_id]
            del self.cached[block.hash]  # type: ignore[arg-type]
            block.hash = None
            self._free_plain.append(block_id)
        self._free_cached.clear()

    # ---- debugging ----------------------------------------------------------------------------------------
    def check_invariants(self, requests: Iterable[Request]) -> None:
        """Raise ``AssertionError`` if the pool is inconsistent with the block tables of ``requests``
        (which must be every request currently holding blocks). For tests and debugging."""
        requests = list(requests)
        refs = [0] * self.num_blocks
        for request in requests:
            assert len(set(request.block_ids)) == len(request.block_ids), (
                f"{request.request_id}: repeated block"
            )
            for block_id in request.block_ids:
                refs[block_id] += 1
        plain, cached_free = set(self._free_plain), set(self._free_cached)
        assert len(plain) == len(self._free_plain) and not plain & cached_free, "a block is free twice"
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count}"
            )
            is_free = block.block_id in plain or block.block_id in cached_free
            assert is_free == (block.ref_count == 0), f"block {block.block_id}: free-pool membership"
            if block.block_id in cached_free:
                assert block.hash is not None and self.cached.get(block.hash) == block.block_id
            if block.block_id in plain:
                assert block.hash is None, f"block {block.block_id}: plain free block with a hash"
        for key, block_id in self.cached.items():
            assert self.blocks[block_id].hash == key, f"block {block_id}: hash map out of date"
        for request in requests:
            full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
            for i, block_id in enumerate(request.block_ids):
                if self.blocks[block_id].ref_count > 1:
                    assert i < full, f"block {block_id}: shared by several requests but not full"
