"""Canonical gated activation of a GLU MLP: ``autodeploy::torch_glu``.

``torch_glu(gate [..., I], up [..., I], activation) = act(gate) * up`` — the SwiGLU (``silu``) / GeGLU (``gelu``,
``gelu_tanh``) core of a gated MLP. The three linears around it stay ``aten.linear`` nodes so quantization and
sharding treat them like every other linear; ``fuse_gate_up`` later merges the gate and up linears and switches
to the fused form ``torch_glu_packed(gate_up [..., 2I])`` (gate first, then up).
"""

from __future__ import annotations

import torch

from .activation import apply_activation


@torch.library.custom_op("autodeploy::torch_glu", mutates_args=())
def torch_glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return apply_activation(activation, gate) * up


@torch_glu.register_fake
def _torch_glu_fake(gate, up, activation):
    return torch.empty_like(up)


@torch.library.custom_op("autodeploy::torch_glu_packed", mutates_args=())
def torch_glu_packed(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return apply_activation(activation, gate) * up


@torch_glu_packed.register_fake
def _torch_glu_packed_fake(gate_up, activation):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
