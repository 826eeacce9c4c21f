"""Canonical mixture-of-experts: ``autodeploy::torch_moe``.

The router (linear, softmax/sigmoid, top-k, renormalisation) stays in the graph as the model wrote it; the op
takes its result and computes, per token ``t``::

    sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])

with ``expert_e(x) = w_down[e] @ glu(w_up[e] @ x + b_up[e]) + b_down[e]`` (weights in ``nn.Linear`` layout):

- ``x [T, H]``, ``topk_ids [T, K]`` (int), ``topk_weights [T, K]``;
- ``w_up [E, U, H]`` with ``U = 2 * I`` when ``gated`` (gate rows then up rows, or alternating rows when
  ``interleaved``) and ``U = I`` otherwise; ``w_down [E, H, I]``; optional biases ``[E, U]`` and ``[E, H]``;
- ``activation`` names the function applied to the gate (or to the whole projection when not gated);
  ``"swiglu_oai"`` is gpt-oss's clamped form ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`` with
  ``g = clamp(gate, max=limit)``;
- with ``w_up_scale [E, U]`` and ``w_down_scale [E, H]`` (float32) the weights are float8 codes with one scale per
  output row (``quantize_fp8_moe``): each projection is ``(x @ codes^T) * scale`` accumulated in float32 and
  rounded once to the activations' dtype.

Expert ids outside ``[0, E)`` contribute nothing (the expert-parallel sentinel).
"""

from __future__ import annotations

import torch

from .activation import apply_activation


def moe_glu(
    proj: torch.Tensor, activation: str, gated: bool, interleaved: bool, limit: float | None, alpha: float | None
) -> torch.Tensor:
    if not gated:
        return apply_activation(activation, proj)
    if interleaved:
        gate, up = proj[..., 0::2], proj[..., 1::2]
    else:
        gate, up = proj.chunk(2, dim=-1)
    if activation == "swiglu_oai":
        limit = float("inf") if limit is None else limit
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * (1.0 if alpha is None else alpha)))
    return apply_activation(activation, gate) * up


def _project(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``a @ w^T`` in ``a``'s dtype; float8 ``w`` times its per-row ``scale``, in float32, rounded once."""
    if scale is None:
        return a @ w.t()
    return ((a.float() @ w.float().t()) * scale.float()).to(a.dtype)


def moe_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    activation: str,
    gated: bool,
    interleaved: bool,
    limit: float | None,
    alpha: float | None,
    w_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    num_experts = w_up.shape[0]
    for e in range(num_experts):
        token_idx, slot = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        h = _project(x[token_idx], w_up[e], None if w_up_scale is None else w_up_scale[e])  # [n, U]
        if b_up is not None:
            h = h + b_up[e]
        h = moe_glu(h, activation, gated, interleaved, limit, alpha)
        y = _project(h, w_down[e], None if w_down_scale is None else w_down_scale[e])  # [n, H]
        if b_down is not None:
            y = y + b_down[e]
        out.index_add_(0, token_idx, y.float() * topk_weights[token_idx, slot, None].float())
    return out.to(x.dtype)


@torch.library.custom_op("autodeploy::torch_moe", mutates_args=())
def torch_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    limit: float | None = None,
    alpha: float | None = None,
    w_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return moe_reference(
        x, topk_ids, topk_weights, w_up, w_down, b_up, b_down, activation, gated, interleaved, limit, alpha,
        w_up_scale, w_down_scale,
    )


@torch_moe.register_fake
def moe_fake(x, topk_ids, topk_weights, w_up, w_down, b_up=None, b_down=None, activation="silu",
             gated=True, interleaved=False, limit=None, alpha=None, w_up_scale=None, w_down_scale=None):
    """The fake kernel of every ``<backend>_moe`` (same signature, same output)."""
    return torch.empty_like(x)
