"""Synthetic requests: random prompt tokens of a fixed input length, a fixed number of output tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticRequest:
    prompt_token_ids: list[int]
    output_len: int


def synthetic_requests(num: int, isl: int, osl: int, vocab_size: int, seed: int = 0) -> list[SyntheticRequest]:
    """``num`` prompts of ``isl`` random ids (away from special ids at both ends of the vocabulary)."""
    rng = random.Random(seed)
    low, high = min(100, vocab_size // 4), max(vocab_size - 100, vocab_size * 3 // 4)
    return [SyntheticRequest([rng.randrange(low, high) for _ in range(isl)], osl) for _ in range(num)]
