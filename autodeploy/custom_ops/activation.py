"""Activation functions by name, shared by the gated-MLP and MoE ops (and their fast backends)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
}


def apply_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    try:
        return ACTIVATIONS[name](x)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
