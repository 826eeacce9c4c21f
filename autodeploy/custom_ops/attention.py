"""Canonical attention: ``autodeploy::torch_attention``.

Layout is ``bsnd``: q ``[B, S, Nq, D]``, k ``[B, S, Nkv, D]``, v ``[B, S, Nkv, Dv]`` -> ``[B, S, Nq, Dv]``.
Grouped-query attention is implicit (``Nq % Nkv == 0``). The op is always causal over the ``S`` positions of a
sequence; the optional parts are those real models use:

- ``scale``: softmax scale (default ``D ** -0.5``);
- ``sliding_window``: a key is visible only if ``q_pos - k_pos < sliding_window``;
- ``logit_cap``: ``cap * tanh(logits / cap)`` before the softmax (Gemma 2);
- ``sinks``: one learned logit per query head that joins the softmax denominator (gpt-oss);
- ``alibi_slopes``: per query head, adds ``slope * (k_pos - q_pos)`` to the logits (BLOOM, MPT);
- ``chunk_size``: a key is visible only if it is in the query's chunk, ``k_pos // chunk_size == q_pos // chunk_size``
  (Llama 4's chunked local attention);
- ``mask``: a mask the model built (bool: True = visible, or float: added), ``[B, 1 or Nq, S, Sk]``, applied on
  top. Only export produces it (a routed model's own mask); ``match_attention`` folds it into ``sliding_window`` /
  ``chunk_size`` by evaluating it, and cached backends never receive it.

Arguments after ``alibi_slopes`` are trailing and optional: graphs leave them out when they are ``None``.

Cached backends (paged KV cache) implement the same function over a flattened token batch.
"""

from __future__ import annotations

import torch


def attention_reference(
    q: torch.Tensor,  # [B, S, Nq, D]
    k: torch.Tensor,  # [B, Sk, Nkv, D]
    v: torch.Tensor,  # [B, Sk, Nkv, Dv]
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,  # [Nq]
    alibi_slopes: torch.Tensor | None = None,  # [Nq]
    q_positions: torch.Tensor | None = None,  # [S] absolute positions of the queries
    k_positions: torch.Tensor | None = None,  # [Sk]
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,  # [B, 1 or Nq, S, Sk]
) -> torch.Tensor:
    """Plain-torch attention in float32. Also used by the cached reference backend (one sequence at a time)."""
    n_q, n_kv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf = q.float().transpose(1, 2)  # [B, Nq, S, D]
    kf = k.float().transpose(1, 2).repeat_interleave(n_q // n_kv, dim=1)  # [B, Nq, Sk, D]
    vf = v.float().transpose(1, 2).repeat_interleave(n_q // n_kv, dim=1)
    logits = qf @ kf.transpose(-1, -2) * scale  # [B, Nq, S, Sk]
    if logit_cap is not None and logit_cap > 0:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    s, sk = q.shape[1], k.shape[1]
    if q_positions is None:
        q_positions = torch.arange(sk - s, sk, device=q.device)
    if k_positions is None:
        k_positions = torch.arange(sk, device=q.device)
    rel = k_positions[None, :] - q_positions[:, None]  # [S, Sk], <= 0 where visible
    if alibi_slopes is not None:
        logits = logits + alibi_slopes.float()[:, None, None] * rel.float()
    visible = rel <= 0
    if sliding_window is not None and sliding_window > 0:
        visible = visible & (rel > -sliding_window)
    if chunk_size is not None and chunk_size > 0:
        visible = visible & (k_positions[None, :] // chunk_size == q_positions[:, None] // chunk_size)
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        logits = logits + mask.float()
    logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(logits.shape[0], -1, logits.shape[2], 1)
        logits = torch.cat([logits, sink], dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    out = probs @ vf  # [B, Nq, S, Dv]
    return out.transpose(1, 2).to(q.dtype).contiguous()


@torch.library.custom_op("autodeploy::torch_attention", mutates_args=())
def torch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    return attention_reference(
        q, k, v, scale, sliding_window, logit_cap, sinks, alibi_slopes, chunk_size=chunk_size, mask=mask
    )


@torch_attention.register_fake
def _torch_attention_fake(
    q, k, v, scale=None, sliding_window=None, logit_cap=None, sinks=None, alibi_slopes=None, chunk_size=None, mask=None
):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
