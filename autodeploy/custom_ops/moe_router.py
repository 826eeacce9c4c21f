"""Softmax top-k routing: ``autodeploy::torch_moe_router(logits, top_k, normalize, weights_dtype)``.

The router of Qwen-MoE and Mixtral-style blocks, as one op::

    p = softmax(float32(logits), -1);  weights, ids = topk(p, top_k)  (largest first)
    if normalize: weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(weights_dtype)  (HF casts them to the model dtype before the experts)

``logits [T, E]`` (any float dtype), ``weights [T, top_k]`` in ``weights_dtype`` (float32 unless the graph cast
them), ``ids [T, top_k]`` int64. The reference runs exactly these torch calls, so it equals the graph it replaces;
the Triton twin (``triton/moe_router.py``) does the same arithmetic in one launch per step and breaks exact ties
toward the lower expert id.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("autodeploy::torch_moe_router", mutates_args=())
def torch_moe_router(
    logits: torch.Tensor, top_k: int, normalize: bool, weights_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(weights_dtype), ids


@torch_moe_router.register_fake
def moe_router_fake(logits, top_k, normalize, weights_dtype=torch.float32):
    shape = (*logits.shape[:-1], top_k)
    return logits.new_empty(shape, dtype=weights_dtype), logits.new_empty(shape, dtype=torch.int64)
