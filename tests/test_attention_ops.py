"""The canonical attention's newer optional parts: ``chunk_size`` (chunked local attention) and ``mask``, in the
torch reference and in the paged reference backend (one sequence fed in pieces must equal one full forward)."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops  # noqa: F401  (registers the ops)

ops = torch.ops.autodeploy


def _qkv(batch: int, seq: int, n_q: int = 6, n_kv: int = 2, d: int = 7, dv: int = 5):
    return torch.randn(batch, seq, n_q, d), torch.randn(batch, seq, n_kv, d), torch.randn(batch, seq, n_kv, dv)


def _explicit(seq: int, window: int | None, chunk: int | None) -> torch.Tensor:
    q, k = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    keep = k <= q
    if window is not None:
        keep &= q - k < window
    if chunk is not None:
        keep &= k // chunk == q // chunk
    return keep[None, None]  # [1, 1, S, S]


@pytest.mark.parametrize("window, chunk", [(None, 4), (None, 5), (3, 5), (6, 4)])
def test_chunk_size_equals_its_explicit_mask(window, chunk):
    q, k, v = _qkv(2, 19)
    by_args = ops.torch_attention(q, k, v, 0.4, window, None, None, None, chunk)
    by_mask = ops.torch_attention(q, k, v, 0.4, None, None, None, None, None, _explicit(19, window, chunk))
    torch.testing.assert_close(by_args, by_mask)


def test_float_mask_is_added():
    q, k, v = _qkv(1, 9)
    bias = torch.where(_explicit(9, 3, None), 0.0, torch.finfo(torch.float32).min)
    torch.testing.assert_close(
        ops.torch_attention(q, k, v, None, None, None, None, None, None, bias), ops.torch_attention(q, k, v, None, 3)
    )


@pytest.mark.parametrize("chunk", [3, 8])
def test_paged_reference_with_chunks_equals_one_forward(chunk):
    """Prefill 11 tokens in two pieces, then decode 6 one by one, through a paged cache of 4-token pages."""
    torch.manual_seed(0)
    total, page, n_kv, d = 17, 4, 2, 7
    q, k, v = _qkv(1, total, d=d, dv=d)
    expected = ops.torch_attention(q, k, v, None, None, None, None, None, chunk)
    k_cache, v_cache = torch.zeros(8, page, n_kv, d), torch.zeros(8, page, n_kv, d)
    page_table = torch.tensor([[5, 2, 7, 0, 3]], dtype=torch.int32)
    steps = [(0, 6), (6, 5)] + [(i, 1) for i in range(11, total)]
    out = torch.empty_like(expected)
    for start, n in steps:
        positions = torch.arange(start, start + n)
        slots = (page_table[0, positions // page].long() * page + positions % page).to(torch.int64)
        prefill = n > 1
        got = ops.torch_cached_attention(
            q[:, start : start + n], k[:, start : start + n], v[:, start : start + n], k_cache, v_cache,
            torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32),
            torch.tensor([start], dtype=torch.int32), page_table, slots,
            torch.tensor([1, n, 0] if prefill else [0, 0, 1], dtype=torch.int32),
            None, None, None, None, None, chunk,
        )  # fmt: skip
        out[:, start : start + n] = got
    torch.testing.assert_close(out, expected)
